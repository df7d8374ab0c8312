"""The projection pipeline of a trained run: thresholds, localisation of the test split, scores, outputs.

    out_dir, metrics = project_run(run_dir, DataConfig, ProjectionConfig, ThresholdConfig)

Writes <run>/projections/v<N>/ (`iepjax.outputs`, `iepjax.report`). Runs with a preprocess.json
(every run of `pipelines.train`) are scored with the official MVTec AD protocol: maps at each test
image's original size (`scoring.official_metrics`), also written as TIFF (docs/method.md, Evaluation).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from iepjax import calibrated_maps, data, distributed, outputs, presets, report, runs
from iepjax.atomic import dumps_json
from iepjax.config import DataConfig, MapConfig, ProjectionConfig, ThresholdConfig
from iepjax.data.layout import DataError, list_images
from iepjax.data.preprocess import Preprocess, resize_images, resize_masks
from iepjax.early_stop import with_early_stop
from iepjax.localization import Localization, calibrate_maps, localize, localize_images, trajectory
from iepjax.scoring import official_metrics, split_metrics
from iepjax.thresholds import (FITTED, GIVEN, ThresholdError, both_given, calibrate, check_held_out, given,
                               given_only, held_out_ids, held_out_images, load_or_calibrate, load_or_resolve, map_fits,
                               min_held_out, normal_folder_images, run_source)
from iepjax.training import load_checkpoint


class PreparedRun(NamedTuple):
    """A trained run ready to project: its parameters, the projection config (the run's model and,
    with early stopping, the stopping loss), its preprocessing (None for runs without
    preprocess.json), the thresholds used ({"grad", "recon"} -> NormalStats), where they come
    from, the compile seconds of a threshold calibration done now (else None), and the record of
    alpha and lam resolved in the model's units (`thresholds.load_or_resolve`; None when given directly)."""

    params: dict
    config: ProjectionConfig
    prep: Preprocess | None
    stats: dict
    source: str
    compile_s: float | None
    scale: dict | None = None


def open_run(results: str | Path, model: str, source: DataConfig, run: str | None = None,
             thresholds: ThresholdConfig = ThresholdConfig(), *, allow_collapse: bool = False,
             input_dir: str | Path | None = None, out: str | Path | None = None,
             overwrite: bool = False) -> tuple[Path, ProjectionConfig, list[str]]:
    """Find the run to project and refuse, before any work, what cannot work; returns (run folder,
    the category preset's projection config for the run's likelihood, warnings to print).

    Raises, each with a message that says what to do: ValueError for an unknown category or a run
    of another one; FileNotFoundError for a missing run, checkpoint or input folder; PermissionError
    for folders this process cannot write; FileExistsError for an existing `out` (unless
    `overwrite`); `runs.CollapsedRun` for a model that collapsed to the mean image (unless
    `allow_collapse`); `thresholds.ThresholdError` for too few held-out normal images to fit the
    thresholds that are not given. With `input_dir`, the checks are those of `infer_folder`.
    """
    presets.check(source.dataset, source.category)  # an unknown category is named before a missing run
    run_dir = runs.find_run(results, model, source.dataset, source.category, run)
    runs.check_outputs_writable(run_dir, out if input_dir is not None else None, inference=input_dir is not None)
    if thresholds.normal_dir is not None:
        list_images(thresholds.normal_dir)  # the folder exists
    if input_dir is not None:
        list_images(input_dir)  # the folder exists
        if out is not None:
            runs.check_output_folder(out, overwrite=overwrite)
    warnings = runs.check_trained(run_dir, source.category, allow_collapse=allow_collapse)
    check_held_out(run_dir, thresholds)
    return run_dir, run_preset(run_dir, source), warnings


def run_preset(run_dir: Path, source: DataConfig) -> ProjectionConfig:
    """The category preset's projection settings for the model run_dir was trained with: alpha and lam
    follow its likelihood (a --likelihood bce run gets the BCE values), the smoothing its size."""
    trained = runs.model_config(run_dir)
    return presets.projection_config(source.dataset, source.category, trained.get("likelihood"),
                                     size=trained.get("size"))


def prepare_run(run_dir: Path, source: DataConfig, config: ProjectionConfig | None = None,
                thresholds: ThresholdConfig = ThresholdConfig(), *, batch_size: int = 16, progress: bool = True,
                mesh=None) -> PreparedRun:
    """Load a run and fit (or read) its thresholds on its held-out normal images for `config`
    (default: the category preset's, for the run's likelihood). Its `step` / `hold` (alpha and lam
    in the model's own units, the presets' default) are first resolved on those normal images
    (`thresholds.load_or_resolve`, recorded in the run folder).

    Too few held-out images for a fit are refused (`thresholds.check_held_out`, ThresholdError)
    before any image is loaded, unless both thresholds are given: then nothing is fitted
    (`thresholds.given_only`). Early stopping takes its bar from the held-out images
    (docs/method.md, Projection). The "nce" map (`thresholds.map`) is fitted on the same images,
    on raw maps: the projection then runs with smoothing_sigma 0 (the map's window smooths).
    With `thresholds.normal_dir`, the thresholds (and the nce map) are fitted on the readable images
    of that folder instead (`thresholds.normal_folder_images`), every time, and not stored in the
    run folder; alpha, lam and early stopping still come from the held-out images, and from that
    folder's images only for a run that holds out none (trained with --holdout 0).
    """
    params, tcfg, step = load_checkpoint(run_dir)
    if config is None:
        config = presets.projection_config(source.dataset, source.category, tcfg.model.likelihood,
                                           size=tcfg.model.size)
    nce = thresholds.map.kind == "nce"
    config = calibrated_maps.projection_for(dataclasses.replace(config, model=tcfg.model), thresholds.map)
    check_held_out(run_dir, thresholds)
    on_line = thresholds.normal_dir is not None  # the thresholds are fitted on the user's normal images
    held = held_out_ids(run_dir)
    fit = on_line or not (both_given(thresholds) and len(held) < min_held_out(thresholds))
    if nce and not fit:
        raise ThresholdError(f"run {run_dir} holds out too few normal images to fit the nce map on (it needs "
                             f"{min_held_out(thresholds)}): use --map paper")
    prep = Preprocess.load(run_dir)
    line = None
    if on_line:
        line = normal_folder_images(thresholds.normal_dir, tcfg.model.channels,
                                    prep.intensity_window if prep is not None else None,
                                    image_quantile=thresholds.image_quantile)
        line = line if prep is not None else resize_images(line, tcfg.model.size)
    if not config.resolved and not held and line is None:  # trained with --holdout 0, thresholds given
        print(f"warning: run {run_dir} holds out no normal image to resolve the projection's step and hold on: "
              f"alpha {config.alpha:g} and lam {config.lam:g} are used as they are (the values they give the "
              "built-in brick model); pass --alpha and --lam for this model's scale", file=sys.stderr)
        config = dataclasses.replace(config, step=None, hold=None)
    normal = []
    if held and ((fit and not on_line) or thresholds.early_stop or not config.resolved):
        normal = distributed.main_first(  # process 0 prepares the data set, then the others read it
            lambda: held_out_images(run_dir, source.dataset, source.category, source.tfds_dir,
                                    source_dir=source.source_dir))
    if held:  # alpha, lam and the early-stopping bar describe the model: from its held-out images
        config, scale = load_or_resolve(run_dir, params, config, normal, step=step)
    else:  # a run without any (--holdout 0): from the user's normal images, not kept in the run folder
        normal = line if line is not None else []
        config, scale = load_or_resolve(run_dir, params, config, normal, step=step, keep=False)
    if thresholds.early_stop and config.stop_loss is None:
        config = with_early_stop(params, config, normal, prep)
    if not fit:
        return PreparedRun(params, config, prep, given_only(thresholds), GIVEN, None, scale)
    if on_line:  # not kept in the run folder: its thresholds.json holds the held-out images' fit
        stats, compile_s = calibrate(params, config, line, thresholds, prep=prep, batch_size=batch_size,
                                     progress=progress, mesh=mesh)
        stats, where = given(stats, thresholds, f"{len(line)} normal images in {thresholds.normal_dir}")
        return PreparedRun(params, config, prep, stats, where, compile_s, scale)
    stats, compile_s = load_or_calibrate(run_dir, params, config, normal, thresholds, step=step,
                                         batch_size=batch_size, progress=progress, mesh=mesh)
    stats, where = given(stats, thresholds)
    return PreparedRun(params, config, prep, stats, where, compile_s, scale)


def project_run(run_dir: Path, source: DataConfig, config: ProjectionConfig | None = None,
                thresholds: ThresholdConfig = ThresholdConfig(), *, batch_size: int = 16, overlays: bool = True,
                progress: bool = True, mesh=None, data_seed: int = 0,
                test_split: dict | None = None) -> tuple[Path | None, dict]:
    """Evaluate a trained run on the test split: writes run_dir/projections/v<N>/; returns (folder, metrics).

    `config` defaults to the category preset's projection settings; its model is the run's. The
    thresholds come from the run's held-out normal images (`prepare_run`) unless `thresholds`
    gives them. `source.source_dir`: the image folder / MVTec AD download (default: the one the
    run was trained on). `mesh`: as in `localization.localize`; with several processes each
    projects its share and process 0 writes everything, the others return (None, {}). `data_seed`:
    the built-in data's split seed (0, the reported split; 1, the calibration split of
    docs/calibration.md), recorded in the metrics when not 0. `test_split`: other builder-config
    fields of the built-in test split, e.g. {"defect_kinds": defects.DETAIL_LOSS_KINDS} (recorded
    in the metrics); the held-out normal images, and so the thresholds, stay the run's.
    """
    split_seed = {**({"seed": data_seed} if data_seed else {}), **(test_split or {})}
    run = prepare_run(run_dir, source, config, thresholds, batch_size=batch_size, progress=progress, mesh=mesh)
    size, official, map_cfg = run.config.model.size, None, thresholds.map
    fits = map_fits(run.stats) if map_cfg.kind == "nce" else None
    if run.prep is not None:  # the official protocol at the original image sizes
        test = data.load_split(source.dataset, source.category, "test", source.tfds_dir,
                               source_dir=run_source(run_dir, source.source_dir), progress=progress, **split_seed)
        if test.intensity_window != run.prep.intensity_window:
            raise DataError(f"the images of {source.category} are read through the intensity window "
                            f"{test.intensity_window} (from the folder's training images now), but run {run_dir} was "
                            f"trained through {run.prep.intensity_window}: the training images changed since; train "
                            "again (python train.py ... --new)")
        res = localize_images(run.params, run.config, test.images, run.prep, batch_size=batch_size,
                              progress=progress, mesh=mesh)
        if not distributed.is_main():
            return None, {}
        res = calibrate_maps(res, test.images, fits, map_cfg)
        official = official_metrics(res.maps, test, map_cfg, {row: st.pixel_threshold for row, st in run.stats.items()})
        if official["protocol"].get("note"):
            print(f"note: {official['protocol']['note']}", file=sys.stderr)
        test, loc = test._replace(images=res.view_images, masks=resize_masks(test.masks, size)), res.loc
    else:  # a run without preprocess.json: the test images resized to the model size
        test = data.load_split(source.dataset, source.category, "test", source.tfds_dir, **split_seed)
        test = test._replace(images=resize_images(test.images, size), masks=resize_masks(test.masks, size))
        loc = localize(run.params, test.images, run.config, batch_size=batch_size, progress=progress, mesh=mesh)
        if not distributed.is_main():
            return None, {}
        loc = calibrate_maps(loc, test.images, fits, map_cfg)
    with runs.new_output(Path(run_dir) / "projections") as out:  # complete or absent (iepjax.atomic)
        if run.scale is not None:  # how alpha and lam were resolved (docs/method.md, Projection)
            runs.atomic_write_text(out.path / "loss_scale.json", dumps_json(run.scale))
        if official is not None:  # TIFF maps at the original sizes; paths as they will be once complete
            official["protocol"]["tiff_maps"] = {
                row: str(out.final / Path(root).relative_to(out.path))
                for row, root in outputs.write_maps(out.path, source.category, test.ids, res.maps).items()}
        result = evaluate(run.params, run.config, test, loc, run.stats, out.path, source=run.source,
                          official=official, overlays=overlays, compiled_in_calibration=run.compile_s,
                          map_cfg=map_cfg, data_seed=data_seed, test_split=test_split)
    return out.final, result


def evaluate(params: dict, config: ProjectionConfig, test, loc: Localization, stats: dict, out_dir: Path, *,
             source: str = FITTED, official: dict | None = None, overlays: bool = True,
             compiled_in_calibration: float | None = None, map_cfg: MapConfig = MapConfig(),
             data_seed: int = 0, test_split: dict | None = None) -> dict:
    """Score a labelled split's localisation and write the projection folder; returns the metrics.

    `test`: an `iepjax.data.Split` at the model size; `stats`: {"grad", "recon"} -> NormalStats
    (the thresholds), `source` says where they come from; `official` and
    `compiled_in_calibration`, `map_cfg` (the map and image score of `loc`): as in
    `scoring.split_metrics`. Writes metrics.json,
    thresholds.json, maps, scores.csv, pictures and index.html; with `overlays`, also a panel
    per image and the iteration strip (which projects a few images again, a second compiled
    program: `localization.trajectory`).
    """
    out_dir = Path(out_dir)
    result = split_metrics(loc, test, stats, source, official=official,
                           compiled_in_calibration=compiled_in_calibration, map_cfg=map_cfg)
    if data_seed:
        result["data_seed"] = data_seed
    if test_split:  # a test split of other builder-config fields than the default's
        result["test_split"] = {k: list(v) if isinstance(v, tuple) else v for k, v in test_split.items()}
    outputs.write_results(out_dir, result, loc, test.ids, config, stats, source)
    img_scores = calibrated_maps.image_scores(loc.grad_maps, map_cfg, stats["grad"].pixel_threshold)
    report.write_scores_csv(out_dir / "scores.csv", test.ids, test.defect_types, img_scores, test.labels,
                            stats["grad"].image_threshold)
    picks = report.pick_cases(img_scores, test.labels)
    frames = trajectory(params, test.images[picks["strip"]].astype(np.float32) / 255.0, config) if overlays else None
    outputs.write_pictures(out_dir, test, loc, stats["grad"], frames, picks["strip"], overlays)
    report.write_html(out_dir, result, test.ids, test.defect_types, img_scores, test.labels, picks, overlays)
    return result
