"""Pixel and image thresholds from a run's held-out normal images (docs/method.md, Anomaly maps).

The test labels never choose a threshold. A fraction of the normal training images is kept out
of training (`pipelines.train.holdout_split`); their anomaly maps give the score distributions of
normal data, and the thresholds are quantiles of them (`ThresholdConfig`). They are fitted once
per projection config and checkpoint and kept in the run folder (thresholds.json), or given by
the user. The same images resolve the projection's step and hold into alpha and lam
(`load_or_resolve`, loss_scale.json; docs/method.md, Projection). `ThresholdConfig.normal_dir`
fits the thresholds on a folder of normal images taken as the test images are instead
(`normal_folder_images`); such fits are recorded with the outputs, not kept in
the run folder.

Fits that would be nonsense are refused (`ThresholdError`, a message that names the flags):

* too few normal images: the image threshold, at quantile q of n image scores, needs
  n >= min(ceil(1 / (1 - q)), 10) (`min_images`). About 1 / (1 - q) scores resolve the
  quantile; past the 90th percentile the threshold is read off the top of the sample, and a new
  normal image scores above the largest of n normal ones with probability 1 / (n + 1): below 10
  images more than 1 in 11 normal images would be flagged by that alone (1 in 2 with one image).
  The pixel threshold needs at least 10 pixels above its quantile, n_pixels >= 10 / (1 - q)
  (`min_pixels`);
* images frozen at step 0 by early stopping: the bar (`ProjectionConfig.stop_loss`,
  docs/method.md, Projection) is the smallest loss of these same held-out images, so the image
  that set it starts at the bar, never moves and has a map of 0 by construction, not by what the
  projection does to a normal image. Those images (`early_stop.frozen_at_start`) are left out of
  the fit and counted in `NormalStats.n_excluded`; with early stopping one more image is held out
  for that (`min_held_out`). Leaving them out raises the quantiles slightly (a fit on n - 1 of n
  images): the cautious side, fewer false alarms. With one held-out image, the fit would have
  been that image's zero map: thresholds of 0 that flag every image;
* a fitted threshold that is not finite, or not above 0 (`map >= 0` flags every pixel).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from iepjax import calibrated_maps, data, loss_scale
from iepjax.atomic import dumps_json, finite_or_none
from iepjax.config import MapConfig, ProjectionConfig, ThresholdConfig, to_dict
from iepjax.data.preprocess import Preprocess, model_inputs, resize_images
from iepjax.early_stop import frozen_at_start
from iepjax.localization import calibrate_maps, localize, localize_images
from iepjax.runs import atomic_write_text, model_config, read_json

FITTED = "held-out normal training images"  # the thresholds' source in the outputs
GIVEN = "given by the user"
QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0)
MIN_IMAGES = 10    # the most images `min_images` asks for (any quantile above 0.9)
PIXELS_ABOVE = 10  # pixels a pixel threshold must have above it (`min_pixels`)
FLAGS = ("hold out more normal images when training (`python train.py ... --holdout F`, a larger fraction F), "
         "or give both thresholds (`python project.py ... --threshold T --image-threshold T`)")


class ThresholdError(ValueError):
    """Thresholds that cannot be fitted sensibly (too few normal images or pixels, a threshold of 0
    or not finite); the message says why and which flags to use."""


def min_images(quantile: float) -> int:
    """Normal images needed to fit an image threshold at `quantile`: min(ceil(1 / (1 - q)), 10).

    About 1 / (1 - q) scores resolve the q-quantile (2 for the median, 10 for the 90th
    percentile). Above that it is read off the top of the sample, and then n images leave a new
    normal image a 1 / (n + 1) chance of scoring above all of them: 10 images keep that below 1
    in 10 whatever the quantile (q = 1, the maximum, included).
    """
    if quantile >= 1:
        return MIN_IMAGES
    return min(math.ceil(round(1 / (1 - quantile), 6)), MIN_IMAGES)  # round: 1 - 0.9 is not 0.1 in floats


def min_pixels(quantile: float) -> int:
    """Normal pixels needed to fit a pixel threshold at `quantile`: 10 / (1 - q), so that at least 10
    pixels lie above it (0 for q = 1, the largest pixel, which any map has)."""
    return 0 if quantile >= 1 else math.ceil(round(PIXELS_ABOVE / (1 - quantile), 6))


def min_held_out(thresholds: ThresholdConfig) -> int:
    """Normal images to hold out for `thresholds`: `min_images` of its image quantile, plus one with
    early stopping (the image whose loss sets the bar is frozen at step 0 and left out of the fit)."""
    return min_images(thresholds.image_quantile) + (1 if thresholds.early_stop else 0)


def count_rule(thresholds: ThresholdConfig) -> str:
    """The minimum of `min_held_out` in words, for messages."""
    q = thresholds.image_quantile
    rule = (f"at least {min_images(q)} normal images for the image quantile {q} (min(ceil(1/(1-q)), {MIN_IMAGES}): "
            "a new normal image scores above the largest of n with probability 1/(n+1))")
    if thresholds.early_stop:
        rule += ", plus 1 for early stopping (the image that sets its bar is left out of the fit)"
    return rule


class NormalStats(NamedTuple):
    """Score statistics of held-out normal images (never test images) and the thresholds they give.

    pixel_threshold / image_threshold: the `pixel_quantile` / `image_quantile` quantiles of the
    normal pixel scores / image scores (`MapConfig.image_score`); vmax: the heat-map bound (99.9th percentile
    of normal pixel scores, at least the pixel threshold) used for every image's picture;
    n_images: the images fitted on; n_excluded: held-out images left out (frozen at step 0 by
    early stopping); pixel_quantiles / image_quantiles: the score distributions at QUANTILES;
    map_fit: the nce map's tables fitted on the same images (`calibrated_maps.to_json`; None for
    the paper's map). Image scores are `MapConfig.image_score`'s (max for the paper's).
    Thresholds given by the user without a fit (`given`) have no quantiles and n_images 0.
    """

    pixel_threshold: float
    image_threshold: float
    vmax: float
    pixel_quantile: float | None
    image_quantile: float | None
    n_images: int
    pixel_quantiles: dict
    image_quantiles: dict
    n_excluded: int = 0
    map_fit: dict | None = None


def map_fits(stats: dict) -> dict | None:
    """{"grad", "recon"} -> the nce tables stored in `stats` as arrays (None if they hold none)."""
    if any(st.map_fit is None for st in stats.values()):
        return None
    return {row: calibrated_maps.from_json(st.map_fit) for row, st in stats.items()}


def check_count(n_images: int, image_quantile: float, *, n_excluded: int = 0) -> None:
    """Raise ThresholdError unless `n_images` normal images can fit an image threshold at
    `image_quantile` (`min_images`); `n_excluded`: images left out before, for the message."""
    if n_images >= min_images(image_quantile):
        return
    excluded = f" ({n_excluded} more frozen at step 0 by early stopping, left out)" if n_excluded else ""
    raise ThresholdError(
        f"cannot fit thresholds on {n_images} normal image(s){excluded}: the image quantile {image_quantile} "
        f"needs at least {min_images(image_quantile)} (min(ceil(1/(1-q)), {MIN_IMAGES}): a new normal image "
        f"scores above the largest of n with probability 1/(n+1)); {FLAGS}")


def normal_stats(maps_NxHxW: np.ndarray, *, pixel_quantile: float = 0.995, image_quantile: float = 0.99,
                 n_excluded: int = 0, row: str = "grad", map_cfg: MapConfig = MapConfig(),
                 map_fit: dict | None = None) -> NormalStats:
    """Thresholds and picture bounds from the anomaly maps of normal images (N, H, W); image
    scores `map_cfg.image_score` (`calibrated_maps.image_score`), `map_fit` kept with them.

    Raises ThresholdError for fewer images than `min_images(image_quantile)`, fewer pixels than
    `min_pixels(pixel_quantile)`, and thresholds that come out non-finite or not above 0 (`row`:
    the map's name, for the message).
    """
    maps = np.asarray(maps_NxHxW)
    for name, q in (("pixel", pixel_quantile), ("image", image_quantile)):
        if not 0 < q <= 1:
            raise ValueError(f"{name} quantile must be in (0, 1], got {q}")
    check_count(len(maps), image_quantile, n_excluded=n_excluded)
    if maps.size < min_pixels(pixel_quantile):
        raise ThresholdError(
            f"cannot fit the pixel threshold on {maps.size} normal pixels: the pixel quantile {pixel_quantile} needs "
            f"at least {min_pixels(pixel_quantile)} ({PIXELS_ABOVE} pixels above it); {FLAGS}, "
            "or a lower --pixel-quantile")
    pt = float(np.quantile(maps, pixel_quantile))
    img = calibrated_maps.image_scores(maps, map_cfg, pt)
    it = float(np.quantile(img, image_quantile))
    for name, q, t in (("pixel", pixel_quantile, pt), ("image", image_quantile, it)):
        if not (math.isfinite(t) and t > 0):
            raise ThresholdError(
                f"the {row} {name} threshold fitted on {len(maps)} normal images is {t} (their {name} scores at "
                f"the quantile {q}): " + ("the maps are not finite (a diverged model: train it again)" if not
                                          math.isfinite(t) else
                                          "the projection left almost all of their pixels unchanged, and a threshold "
                                          "of 0 flags every pixel; project with more --steps, a larger --alpha or "
                                          "a smaller --lam") + ", or give both thresholds (--threshold T "
                                                               "--image-threshold T)")
    vmax = max(float(np.quantile(maps, 0.999)), pt, 1e-6)
    return NormalStats(pt, it, vmax, pixel_quantile, image_quantile, len(maps),
                       {str(q): float(np.quantile(maps, q)) for q in QUANTILES},
                       {str(q): float(np.quantile(img, q)) for q in QUANTILES}, n_excluded, map_fit)


def calibrate(params: dict, config: ProjectionConfig, normal_images: np.ndarray,
              thresholds: ThresholdConfig = ThresholdConfig(), *, prep: Preprocess | None = None,
              batch_size: int = 16, progress: bool = True, mesh=None) -> tuple[dict, float]:
    """Project held-out normal images (M, H, W, C) uint8 and fit thresholds at `thresholds`' quantiles.

    Returns ({"grad", "recon"} -> NormalStats, the first batch's seconds, which compile the
    projection). With `prep`, the images may have any size and go through it (objects resized,
    textures tiled) as the test images do; maps at the model size. `mesh`: as in `localize`.
    Images frozen at step 0 by early stopping (`early_stop.frozen_at_start`) are left out, and
    too few images left is a ThresholdError before anything is projected (module docstring).
    With `thresholds.map.kind` "nce" the map's tables are fitted on these images' raw maps first
    (`calibrated_maps.fit_normal`, no label anywhere) and the thresholds on their nce maps.
    """
    frozen = frozen_at_start(params, config, normal_images, prep)
    n_excluded = int(frozen.sum())
    if n_excluded:
        normal_images = [im for im, f in zip(normal_images, frozen) if not f]
        if len(normal_images) and all(np.shape(im) == np.shape(normal_images[0]) for im in normal_images):
            normal_images = np.stack(normal_images)
    check_count(len(normal_images), thresholds.image_quantile, n_excluded=n_excluded)  # before any projection
    if prep is not None:
        res = localize_images(params, config, normal_images, prep, batch_size=batch_size, progress=progress, mesh=mesh)
        raw = res.maps
    else:
        res = localize(params, normal_images, config, batch_size=batch_size, progress=progress, mesh=mesh)
        raw = {"grad": res.grad_maps, "recon": res.recon_maps}
    cfg, fits = thresholds.map, None
    if cfg.kind == "nce":
        fits = {row: calibrated_maps.fit_normal(raw[row], normal_images, cfg) for row in ("grad", "recon")}
        res = calibrate_maps(res, normal_images, fits, cfg)
    normal = res.loc if prep is not None else res
    kw = dict(pixel_quantile=thresholds.pixel_quantile, image_quantile=thresholds.image_quantile,
              n_excluded=n_excluded, map_cfg=cfg)
    return ({row: normal_stats(getattr(normal, f"{row}_maps"), row=row, **kw,
                               map_fit=None if fits is None else calibrated_maps.to_json(fits[row]))
             for row in ("grad", "recon")}, normal.compile_s)


def _usable(stats: dict, thresholds: ThresholdConfig) -> bool:
    """Whether stored stats pass today's checks (older runs may hold fits on too few images, or 0)."""
    return all(st.n_images >= min_images(thresholds.image_quantile)
               and all(isinstance(t, (int, float)) and math.isfinite(t) and t > 0
                       for t in (st.pixel_threshold, st.image_threshold))
               for st in stats.values())


def _record_key(prep: Preprocess | None, step: int | None, **fields) -> dict:
    """What a record kept in the run folder was made for: `fields`, the checkpoint `step` (when
    given) and the run's preprocessing (when it has one), as stored (strict JSON)."""
    if step is not None:
        fields["checkpoint_step"] = int(step)
    if prep is not None:
        fields["preprocess"] = prep.to_dict()
    return finite_or_none(fields)


def _stored_record(path: Path, want: dict) -> dict | None:
    """The JSON record at `path` if it was made for `want` (the same value under each of its keys),
    else None (missing, unreadable, or made for something else)."""
    try:
        stored = read_json(path)
    except ValueError:
        return None
    if not isinstance(stored, dict) or {k: stored.get(k) for k in want} != want:
        return None
    return stored


def load_or_calibrate(run_dir: Path, params: dict, config: ProjectionConfig, normal_images: np.ndarray,
                      thresholds: ThresholdConfig = ThresholdConfig(), *, step: int | None = None,
                      batch_size: int = 16, progress: bool = True, mesh=None) -> tuple[dict, float | None]:
    """Thresholds stored in run_dir/thresholds.json for this projection config (and checkpoint `step`,
    when given: a run resumed or still training has newer parameters), else fitted and stored.

    Returns ({"grad", "recon"} -> NormalStats, the calibration pass's compile seconds if they were
    computed now, else None). Runs with a preprocess.json preprocess the images with it. With
    several processes, process 0 writes the file. Raises ThresholdError (`calibrate`) when they
    cannot be fitted sensibly; stored thresholds that would now be refused are fitted again.
    """
    path = Path(run_dir) / "thresholds.json"
    prep = Preprocess.load(run_dir)
    want = _record_key(prep, step, projection=to_dict(config), pixel_quantile=thresholds.pixel_quantile,
                       image_quantile=thresholds.image_quantile, n_images=len(normal_images),
                       map=to_dict(thresholds.map))
    stored = _stored_record(path, want)
    if stored is not None:
        try:
            stats = {k: NormalStats(**stored[k]) for k in ("grad", "recon")}
            if _usable(stats, thresholds) and (thresholds.map.kind == "paper" or map_fits(stats)):
                return stats, None
        except (ValueError, TypeError, KeyError):
            pass  # of another layout: fitted again
    stats, compile_s = calibrate(params, config, normal_images, thresholds, prep=prep, batch_size=batch_size,
                                 progress=progress, mesh=mesh)
    if jax.process_index() == 0:
        atomic_write_text(path, dumps_json({**want, **{k: v._asdict() for k, v in stats.items()}}) + "\n")
    return stats, compile_s


def load_or_resolve(run_dir: Path, params: dict, config: ProjectionConfig, normal_images: np.ndarray, *,
                    step: int | None = None, keep: bool = True) -> tuple[ProjectionConfig, dict | None]:
    """`config` with its `step` / `hold` resolved into alpha / lam on the run's held-out normal images
    (`loss_scale.resolve`; docs/method.md, Projection: scales), and the record of how.

    The record is kept in run_dir/loss_scale.json for this config (and checkpoint `step`, the
    preprocessing and the number of images) and read back instead of measuring again, so that
    train.py's threshold fit and project.py use the same floats. The images go through the run's
    preprocessing, as the test images do. A config with neither is returned as it is (record None).
    `keep` False: neither read nor written (images that are not the run's held-out ones).
    """
    if config.resolved:
        return config, None
    path = Path(run_dir) / "loss_scale.json"
    prep = Preprocess.load(run_dir)
    want = _record_key(prep, step, projection=to_dict(config), n_images=len(normal_images))
    stored = _stored_record(path, want) if keep else None
    if stored is not None:
        try:
            return dataclasses.replace(config, alpha=float(stored["alpha"]), lam=float(stored["lam"]),
                                       step=None, hold=None), stored
        except (ValueError, TypeError, KeyError):
            pass  # of another layout: measured again
    x = model_inputs(normal_images, prep)[0] if prep is not None else resize_images(normal_images, config.model.size)
    resolved, record = loss_scale.resolve(params, config, np.asarray(x, np.float32) / 255.0)
    record = finite_or_none({**want, **record})
    if keep and jax.process_index() == 0:
        atomic_write_text(path, dumps_json(record) + "\n")
    return resolved, record


def given(stats: dict, thresholds: ThresholdConfig, fitted: str = FITTED) -> tuple[dict, str]:
    """`stats` with the thresholds the user gave in place of the fitted ones, and where they come from
    (`fitted`: the images `stats` were fitted on)."""
    pt, it = thresholds.pixel_threshold, thresholds.image_threshold
    if pt is None and it is None:
        return stats, fitted
    source = GIVEN + ("" if (pt is not None and it is not None) else f" (the other from {fitted})")
    return {row: st._replace(pixel_threshold=st.pixel_threshold if pt is None else pt,
                             image_threshold=st.image_threshold if it is None else it)
            for row, st in stats.items()}, source


def both_given(thresholds: ThresholdConfig) -> bool:
    """Whether the user gave both thresholds (nothing then needs to be fitted)."""
    return thresholds.pixel_threshold is not None and thresholds.image_threshold is not None


def given_only(thresholds: ThresholdConfig) -> dict:
    """{"grad", "recon"} -> NormalStats of the two thresholds the user gave, for a run whose held-out
    images are too few to fit any: no quantiles, n_images 0, and the heat maps' bound vmax twice
    the pixel threshold (the threshold mid-scale; fitted stats take the normal pixels' 99.9th
    percentile instead)."""
    if not both_given(thresholds):
        raise ValueError("given_only needs both thresholds")
    pt, it = float(thresholds.pixel_threshold), float(thresholds.image_threshold)
    st = NormalStats(pt, it, max(2 * pt, 1e-6), None, None, 0, {}, {})
    return {"grad": st, "recon": st}


def held_out_ids(run_dir: Path) -> list[str]:
    """The ids of the run's held-out normal training images (holdout.json; [] when it has none)."""
    return list((read_json(Path(run_dir) / "holdout.json") or {}).get("ids") or [])


def _suggest_holdout(run_dir: Path, need: int) -> str:
    """A --holdout that holds out `need` images of the run's training set, when its size is known."""
    try:
        stored = json.loads((Path(run_dir) / "holdout.json").read_text())
        n = stored.get("n_normal_images") or (round(len(stored["ids"]) / stored["fraction"])
                                              if stored.get("fraction") else 0)
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        n = 0
    if not n or need >= n / 2:
        return ""
    return f" of at least {math.ceil(100 * need / n) / 100:g} (it has {n} normal training images)"


def check_held_out(run_dir: Path, thresholds: ThresholdConfig) -> None:
    """Refuse, before the model or data are loaded, a run that holds out too few normal images for
    what `thresholds` asks: fitted thresholds need `min_held_out` (unless both are given), early
    stopping needs at least one. ThresholdError with what to do."""
    k = len(held_out_ids(run_dir))
    if thresholds.early_stop and k == 0 and thresholds.normal_dir is None:
        raise ThresholdError(f"run {run_dir} holds out no normal image, and early stopping takes its bar from them "
                             "(the smallest of their losses): pass --no-early-stop"
                             + ("" if both_given(thresholds) else " and both thresholds (--threshold T "
                                "--image-threshold T)") + ", or retrain with --holdout > 0")
    need = min_held_out(thresholds)
    if k < need and not both_given(thresholds) and thresholds.normal_dir is None:
        raise ThresholdError(f"run {run_dir} holds out {k} normal image(s): too few to fit thresholds, which need "
                             f"{count_rule(thresholds)}. Train a new run with a larger --holdout"
                             f"{_suggest_holdout(run_dir, need)}, or give both thresholds "
                             "(`python project.py ... --threshold T --image-threshold T`)")


def held_out_images(run_dir: Path, dataset: str, category: str, tfds_dir: str | None = None, *,
                    source_dir: str | None = None) -> np.ndarray:
    """The run's held-out normal training images (ids in run_dir/holdout.json).

    Runs with a preprocess.json get the images at their original size (a list when sizes
    differ): `load_or_calibrate` preprocesses them as the test images are; older runs get them at
    the model size. `source_dir`: the image folder / MVTec AD download (default: the run's own).
    ThresholdError when the run holds out none.
    """
    ids = held_out_ids(run_dir)
    if not ids:
        raise ThresholdError(f"{run_dir} has no held-out normal images to fit thresholds on: retrain with "
                             "--holdout > 0, or give both thresholds (--threshold T --image-threshold T) and "
                             "--no-early-stop")
    train = data.load_split(dataset, category, "train", tfds_dir, source_dir=run_source(run_dir, source_dir),
                            progress=False)
    index = {id_: i for i, id_ in enumerate(train.ids)}
    picked = [train.images[index[i]] for i in ids]
    if Preprocess.load(run_dir) is not None:
        return np.stack(picked) if all(p.shape == picked[0].shape for p in picked) else picked
    return resize_images(picked, model_config(run_dir)["size"])


def normal_folder_images(normal_dir: str | Path, channels: int | None = None,
                         window: tuple[float, float] | None = None, *,
                         image_quantile: float | None = None) -> list[np.ndarray]:
    """Every readable image under `normal_dir` (`ThresholdConfig.normal_dir`), uint8 (H, W, C) each,
    in sorted path order; read as the test images are (`channels`, high-depth files through the
    run's `window`). Each unreadable file is named on stderr and left out; FileNotFoundError for a
    missing folder, ThresholdError when no file is readable, or fewer than an image threshold at
    `image_quantile` needs (`min_images`; None: not checked)."""
    from iepjax.data.layout import DataError, list_images, read_image
    images, skipped = [], 0
    for p in list_images(Path(normal_dir)):
        try:
            images.append(read_image(p, channels, window))
        except DataError as e:
            skipped += 1
            print(f"skipped (normal images): {e}", file=sys.stderr)
    if not images:
        raise ThresholdError(f"no readable normal image under {normal_dir}"
                             + (f" ({skipped} unreadable)" if skipped else "") + " to fit thresholds on")
    if image_quantile is not None and len(images) < min_images(image_quantile):
        raise ThresholdError(f"{normal_dir} holds {len(images)} readable normal image(s): the image quantile "
                             f"{image_quantile} needs at least {min_images(image_quantile)}; add normal images to it")
    return images


def run_source(run_dir: Path, source_dir: str | None) -> str | None:
    """`source_dir`, else the image folder the run was trained on (holdout.json), else None."""
    if source_dir is not None:
        return source_dir
    return (read_json(Path(run_dir) / "holdout.json") or {}).get("source_dir")
