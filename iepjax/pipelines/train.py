"""The training pipeline of a category: data -> run folder -> trained model -> thresholds.

    run_dir, summary = train_run(TrainConfig, Preprocess, DataConfig)
    outcome = train_category(TrainConfig, Preprocess, ThresholdConfig, DataConfig)   # what train.py does

The run folder is results/<model>/<dataset>/<category>/v<N>/ (model: vae, ae_l2 or ae_ssim) (`iepjax.runs`): config.json,
preprocess.json, holdout.json, checkpoints/, train_log.csv, training.json and, after
`train_category`, thresholds.json (docs/method.md, Training and Thresholds). A run trained again
after its first model collapsed (`collapse_remedy`) also holds collapse_retry.json.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from iepjax import calibrated_maps, data, distributed, presets, runs
from iepjax.atomic import dumps_json
from iepjax.config import DataConfig, ThresholdConfig, TrainConfig, from_dict, to_dict
from iepjax.data import DataError
from iepjax.data.preprocess import Preprocess, training_inputs
from iepjax.early_stop import with_early_stop
from iepjax.thresholds import (ThresholdError, held_out_ids, held_out_images, load_or_calibrate, load_or_resolve,
                               run_source)
from iepjax.thresholds import min_held_out as held_out_needed
from iepjax.training import TrainSummary, collapse_remedy, train


class RunFailed(FloatingPointError):
    """A trained run that cannot be used (its losses are not finite); `run_dir` names it."""

    def __init__(self, message: str, run_dir: Path):
        super().__init__(message)
        self.run_dir = run_dir


class TrainOutcome(NamedTuple):
    """What `train_category` returns: the run folder, the training summary (with the collapse
    check), the thresholds fitted on the held-out images (None when none were fitted), and the run
    whose model collapsed when this one is its retraining (`collapse_remedy`; else None)."""

    run_dir: Path
    summary: TrainSummary
    thresholds: dict | None
    retried_from: Path | None = None


RETRY_FILE = "collapse_retry.json"  # in a retrained run: the config asked for and the collapsed run


def holdout_split(n: int, fraction: float, seed: int, *, at_least: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Split range(n) into (train, held-out) index arrays; the held-out normal images fit thresholds.

    A fraction > 0 holds out round(n * fraction) images, and at least `at_least`: the count the
    thresholds need (`thresholds.min_held_out`: fewer is refused when they are fitted). Raised to
    that minimum, at least as many must remain for training; else DataError, which says to train
    on all images and give the thresholds (or to ask for that share explicitly).
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    perm = np.random.default_rng([seed, 7]).permutation(n)
    k = int(round(n * fraction)) if fraction > 0 else 0
    raised = fraction > 0 and k < at_least
    if raised:
        k = at_least
    if raised and at_least > 1 and n - k < k:
        left = f"would leave {n - k} to train on" if k < n else "is more than there are"
        explicit = (f", or ask for that split explicitly (--holdout {min(math.ceil(100 * k / n) / 100, 0.99):g})"
                    if k < n else "")
        raise DataError(
            f"only {n} normal training images: holding out the {k} that fitted thresholds need {left}. Train on "
            "all of them (--holdout 0) and give project.py --no-early-stop and either both thresholds (--threshold "
            "T --image-threshold T) or a folder of other normal images to fit them on (--normal-dir DIR)"
            f"{explicit}")
    if n - k < 1:
        raise DataError(f"only {n} training image(s): nothing left to train on after holding out {k}: "
                        "a smaller --holdout")
    return np.sort(perm[k:]), np.sort(perm[:k])


def train_run(config: TrainConfig, prep: Preprocess, source: DataConfig, *, holdout: float = 0.1,
              results: str | os.PathLike = "results", new: bool = False, progress: bool = True,
              mesh=None, min_held_out: int = 1, retry_of: tuple[Path, TrainConfig] | None = None
              ) -> tuple[Path, TrainSummary]:
    """Train on the `train` split of `source` in a run folder; resume its latest run if unfinished.

    A run with the same config, preprocessing and image folder is resumed; anything else, or
    `new=True`, starts v<N+1> (a different test-time tile stride alone keeps the run: the stored
    preprocessing is updated and the thresholds, keyed by it, are fitted again). A fraction
    `holdout` of the normal training images is kept out of training (ids in holdout.json), at least
    `min_held_out` of them (`holdout_split`: checked before any training; a run whose held-out set
    would change is not resumed, its model has seen images now held out). The
    model's channel count is the data's; a texture run's working scale is fixed from its images
    (`Preprocess.with_pixel_scale`, recorded in preprocess.json). `mesh`: data-parallel training (`training.train`); with
    several processes, process 0 chooses the run folder and writes its files. Returns (run folder,
    summary).
    """
    dataset, category = source.dataset, source.category
    split = distributed.main_first(  # process 0 prepares the data set, then the others read it
        lambda: data.load_split(dataset, category, "train", source.tfds_dir, source_dir=source.source_dir,
                                progress=progress))
    channels = int(np.shape(split.images[0])[-1])
    if channels != config.model.channels:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, channels=channels))
    if prep.size != config.model.size:
        raise ValueError(f"preprocess size {prep.size} differs from the model size {config.model.size}")
    shapes = [tuple(np.shape(im)[:2]) for im in split.images]
    prep = prep.with_pixel_scale(shapes)  # textures: one pixel scale for every image, the training images'
    prep = prep.with_tile_stride(shapes)  # and the test tiles' overlap, where the preset leaves it to the images
    prep = dataclasses.replace(prep, intensity_window=split.intensity_window)  # high-depth files: the folder's window
    folder = os.path.abspath(source.source_dir) if (source.source_dir is not None and dataset == "folder") else None
    n_images = len(split.ids)
    train_idx, held_idx = holdout_split(n_images, holdout, config.seed, at_least=min_held_out)
    if holdout > 0 and len(held_idx) > round(n_images * holdout) and distributed.is_main():
        print(f"note: holding out {len(held_idx)} of {n_images} normal training images, not "
              f"{round(n_images * holdout)} (--holdout {holdout}): fitted thresholds need {len(held_idx)} "
              "(docs/method.md, Anomaly maps)", file=sys.stderr)
    held_ids = [split.ids[i] for i in held_idx]
    cat_dir = runs.category_dir(results, config.model.model_name, dataset, category)
    run_dir = None
    if distributed.is_main():
        run_dir = None if (new or retry_of) else runs.latest_run(cat_dir)
        asked = json.loads(dumps_json(to_dict(config)))
        if run_dir is not None:
            old, retry = runs.read_json(run_dir / "config.json"), runs.read_json(run_dir / RETRY_FILE)
            if old is not None and (retry["requested"] if retry else old) != asked:
                run_dir = None  # a different config is a new run
            elif not _same_training_inputs(Preprocess.load(run_dir) or prep, prep, shapes) or run_source(run_dir, None) != folder:
                run_dir = None  # other preprocessing or another image folder: a new run
            elif (run_dir / "holdout.json").exists() and held_out_ids(run_dir) != held_ids:
                run_dir = None  # another held-out set: the model has seen some of them, a new run
            elif retry and old is not None:  # the retraining of this config after a collapse: continue it with its own config
                config = from_dict(TrainConfig, old)
        run_dir = runs.resume_or_new(cat_dir, run_dir)  # held by this process: concurrent runs never share it
        runs.atomic_write_text(run_dir / "config.json", dumps_json(to_dict(config)))
        if retry_of is not None:  # after config.json: killed in between, the run is only not recognised
            runs.atomic_write_text(run_dir / RETRY_FILE, dumps_json(
                {"requested": to_dict(retry_of[1]), "collapsed_run": str(retry_of[0]),
                 "free_bits": config.free_bits}))
        prep.save(run_dir)
        runs.atomic_write_text(run_dir / "holdout.json", dumps_json(
            {"dataset": dataset, "category": category, "fraction": holdout, "source_dir": folder,
             "n_normal_images": n_images, "ids": held_ids}))
    run_dir = Path(distributed.broadcast_text(str(run_dir) if run_dir is not None else None))
    config = from_dict(TrainConfig, json.loads(distributed.broadcast_text(  # process 0 may continue a retraining
        dumps_json(to_dict(config)) if distributed.is_main() else None)))
    images = training_inputs([split.images[i] for i in train_idx], prep, seed=config.seed)
    return run_dir, train(config, images, run_dir, progress=progress, mesh=mesh)


def train_category(config: TrainConfig, prep: Preprocess, thresholds: ThresholdConfig, source: DataConfig, *,
                   results: str | os.PathLike = "results", new: bool = False, progress: bool = True, mesh=None,
                   calibrate_collapsed: bool = False, retry_collapsed: bool = True,
                   projection_steps: int | None = None) -> TrainOutcome:
    """`train_run`, then the thresholds project.py will use by default, fitted on the held-out images.

    A VAE that collapsed to the mean image is trained again, in a new run folder, with the remedy
    `collapse_remedy` gives (free bits), unless `calibrate_collapsed` (the collapsed model is kept as
    it is) or not `retry_collapsed`; `TrainOutcome.retried_from` then names the collapsed run.
    The thresholds are fitted for the category's projection preset (with early stopping, as
    `thresholds.early_stop` says; `projection_steps` replaces its number of steps) and stored in the
    run folder, where project.py reads them back when it projects with the same settings; not when
    nothing is held out, nor for a model that collapsed to the mean image unless `calibrate_collapsed`. Enough images
    are held out for them (`thresholds.min_held_out`, checked before training); should the fit
    still be refused (`thresholds.ThresholdError`: thresholds of 0, ...), the trained run is kept,
    a warning says why, and no thresholds are returned. Raises `RunFailed` (naming the run
    folder) when the trained model's losses are not finite.
    """
    def run(cfg: TrainConfig, **kw) -> tuple[Path, TrainSummary]:
        return train_run(cfg, prep, source, holdout=thresholds.holdout, results=results, progress=progress,
                         mesh=mesh, min_held_out=held_out_needed(thresholds) if thresholds.holdout > 0 else 1, **kw)

    run_dir, summary = run(config, new=new)
    retried_from = None
    remedy = collapse_remedy(summary.config)
    if summary.collapse.collapsed and remedy is not None and retry_collapsed and not calibrate_collapsed:
        if distributed.is_main():
            print(f"note: the model of {run_dir} collapsed to the mean image (reconstruction error "
                  f"{summary.collapse.ratio:.3f}x the constant predictor's); training again with free bits "
                  f"{remedy.free_bits} in a new run folder (docs/calibration.md, Collapse)", file=sys.stderr)
        retried_from = run_dir
        run_dir, summary = run(remedy, retry_of=(run_dir, summary.config))
    elif (retry := runs.read_json(run_dir / RETRY_FILE)) is not None:  # continued a retraining
        retried_from = Path(retry["collapsed_run"])
    if thresholds.holdout == 0 or (summary.collapse.collapsed and not calibrate_collapsed):
        return TrainOutcome(run_dir, summary, None, retried_from)
    model, params = summary.config.model, summary.state.params
    normal = held_out_images(run_dir, source.dataset, source.category, source.tfds_dir)
    pcfg = presets.projection_config(source.dataset, source.category, model.likelihood, size=model.size)
    pcfg = dataclasses.replace(pcfg, model=model, steps=pcfg.steps if projection_steps is None else projection_steps)
    pcfg = calibrated_maps.projection_for(pcfg, thresholds.map)
    try:  # alpha and lam in the model's units, recorded in the run folder (as project.py reads them)
        pcfg, _ = load_or_resolve(run_dir, params, pcfg, normal, step=int(summary.state.step))
    except ValueError as e:
        raise RunFailed(str(e), run_dir) from e
    if thresholds.early_stop:
        try:
            pcfg = with_early_stop(params, pcfg, normal, Preprocess.load(run_dir))
        except FloatingPointError as e:
            raise RunFailed(str(e), run_dir) from e
    try:
        stats, _ = load_or_calibrate(run_dir, params, pcfg, normal, thresholds, step=int(summary.state.step),
                                     progress=progress, mesh=mesh)
    except ThresholdError as e:
        print(f"warning: no thresholds fitted: {e}", file=sys.stderr)
        return TrainOutcome(run_dir, summary, None, retried_from)
    return TrainOutcome(run_dir, summary, stats, retried_from)


def _same_training_inputs(stored: Preprocess, new: Preprocess, shapes_hw: list[tuple[int, int]]) -> bool:
    """Whether a run's stored `Preprocess` and a new one give the same training crops of images of
    `shapes_hw` (they may differ in the test-time tile stride). A run stored without a pixel scale
    scaled each image by its own short side: the same crops when all share one."""
    if not stored.pixel_scale and len({min(h, w) for h, w in shapes_hw}) == 1:
        stored = stored.with_pixel_scale(shapes_hw)
    return dataclasses.replace(stored, tile_stride=0) == dataclasses.replace(new, tile_stride=0)

