"""Pixel and image thresholds from a run's held-out normal images (docs/method.md, Thresholds).

The test labels never choose a threshold. A fraction of the normal training images is kept out
of training (`pipelines.train.holdout_split`); their anomaly maps give the score distributions of
normal data, and the thresholds are quantiles of them (`ThresholdConfig`). They are fitted once
per projection config and kept in the run folder (thresholds.json), or given by the user.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from iepjax import data, metrics
from iepjax.config import ProjectionConfig, ThresholdConfig, to_dict
from iepjax.data.preprocess import Preprocess, resize_images
from iepjax.localization import localize, localize_images
from iepjax.runs import atomic_write_text, model_config

FITTED = "held-out normal training images"  # the thresholds' source in the outputs
QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0)


class NormalStats(NamedTuple):
    """Score statistics of held-out normal images (never test images) and the thresholds they give.

    pixel_threshold / image_threshold: the `pixel_quantile` / `image_quantile` quantiles of the
    normal pixel scores / image scores (max of map); vmax: the heat-map bound (99.9th percentile
    of normal pixel scores, at least the pixel threshold) used for every image's picture;
    pixel_quantiles / image_quantiles: the score distributions at QUANTILES.
    """

    pixel_threshold: float
    image_threshold: float
    vmax: float
    pixel_quantile: float
    image_quantile: float
    n_images: int
    pixel_quantiles: dict
    image_quantiles: dict


def normal_stats(maps_NxHxW: np.ndarray, *, pixel_quantile: float = 0.995,
                 image_quantile: float = 0.99) -> NormalStats:
    """Thresholds and picture bounds from the anomaly maps of normal images (N, H, W)."""
    maps = np.asarray(maps_NxHxW)
    if len(maps) == 0:
        raise ValueError("no normal images to fit thresholds on: hold out at least one training image")
    for name, q in (("pixel", pixel_quantile), ("image", image_quantile)):
        if not 0 < q <= 1:
            raise ValueError(f"{name} quantile must be in (0, 1], got {q}")
    img = metrics.image_scores(maps)
    pt = float(np.quantile(maps, pixel_quantile))
    it = float(np.quantile(img, image_quantile))
    vmax = max(float(np.quantile(maps, 0.999)), pt, 1e-6)
    return NormalStats(pt, it, vmax, pixel_quantile, image_quantile, len(maps),
                       {str(q): float(np.quantile(maps, q)) for q in QUANTILES},
                       {str(q): float(np.quantile(img, q)) for q in QUANTILES})


def calibrate(params: dict, config: ProjectionConfig, normal_images: np.ndarray,
              thresholds: ThresholdConfig = ThresholdConfig(), *, prep: Preprocess | None = None,
              batch_size: int = 16, progress: bool = True, mesh=None) -> tuple[dict, float]:
    """Project held-out normal images (M, H, W, C) uint8 and fit thresholds at `thresholds`' quantiles.

    Returns ({"grad", "recon"} -> NormalStats, the first batch's seconds, which compile the
    projection). With `prep`, the images may have any size and go through it (objects resized,
    textures tiled) as the test images do; maps at the model size. `mesh`: as in `localize`.
    """
    if prep is not None:
        normal = localize_images(params, config, normal_images, prep, batch_size=batch_size,
                                 progress=progress, mesh=mesh).loc
    else:
        normal = localize(params, normal_images, config, batch_size=batch_size, progress=progress, mesh=mesh)
    kw = dict(pixel_quantile=thresholds.pixel_quantile, image_quantile=thresholds.image_quantile)
    return ({"grad": normal_stats(normal.grad_maps, **kw), "recon": normal_stats(normal.recon_maps, **kw)},
            normal.compile_s)


def load_or_calibrate(run_dir: Path, params: dict, config: ProjectionConfig, normal_images: np.ndarray,
                      thresholds: ThresholdConfig = ThresholdConfig(), *, batch_size: int = 16,
                      progress: bool = True, mesh=None) -> tuple[dict, float | None]:
    """Thresholds stored in run_dir/thresholds.json for this projection config, else fitted and stored.

    Returns ({"grad", "recon"} -> NormalStats, the calibration pass's compile seconds if they were
    computed now, else None). Runs with a preprocess.json preprocess the images with it. With
    several processes, process 0 writes the file.
    """
    path = Path(run_dir) / "thresholds.json"
    want = {"projection": to_dict(config), "pixel_quantile": thresholds.pixel_quantile,
            "image_quantile": thresholds.image_quantile, "n_images": len(normal_images)}
    prep = Preprocess.load(run_dir)
    if prep is not None:
        want["preprocess"] = prep.to_dict()
    if path.exists():
        stored = json.loads(path.read_text())
        if {k: stored.get(k) for k in want} == want:
            return {k: NormalStats(**stored[k]) for k in ("grad", "recon")}, None
    stats, compile_s = calibrate(params, config, normal_images, thresholds, prep=prep, batch_size=batch_size,
                                 progress=progress, mesh=mesh)
    if jax.process_index() == 0:
        atomic_write_text(path, json.dumps({**want, **{k: v._asdict() for k, v in stats.items()}}, indent=2))
    return stats, compile_s


def given(stats: dict, thresholds: ThresholdConfig) -> tuple[dict, str]:
    """`stats` with the thresholds the user gave in place of the fitted ones, and where they come from."""
    pt, it = thresholds.pixel_threshold, thresholds.image_threshold
    if pt is None and it is None:
        return stats, FITTED
    source = "given by the user" + ("" if (pt is not None and it is not None) else f" (the other from {FITTED})")
    return {row: st._replace(pixel_threshold=st.pixel_threshold if pt is None else pt,
                             image_threshold=st.image_threshold if it is None else it)
            for row, st in stats.items()}, source


def held_out_images(run_dir: Path, dataset: str, category: str, tfds_dir: str | None = None, *,
                    source_dir: str | None = None) -> np.ndarray:
    """The run's held-out normal training images (ids in run_dir/holdout.json).

    Runs with a preprocess.json get the images at their original size (a list when sizes
    differ): `load_or_calibrate` preprocesses them as the test images are; older runs get them at
    the model size. `source_dir`: the image folder / MVTec AD download (default: the run's own).
    """
    ids = json.loads((Path(run_dir) / "holdout.json").read_text())["ids"]
    if not ids:
        raise ValueError(f"{run_dir} has no held-out normal images to fit thresholds on: retrain with --holdout > 0")
    train = data.load_split(dataset, category, "train", tfds_dir, source_dir=run_source(run_dir, source_dir),
                            progress=False)
    index = {id_: i for i, id_ in enumerate(train.ids)}
    picked = [train.images[index[i]] for i in ids]
    if Preprocess.load(run_dir) is not None:
        return np.stack(picked) if all(p.shape == picked[0].shape for p in picked) else picked
    return resize_images(picked, model_config(run_dir)["size"])


def run_source(run_dir: Path, source_dir: str | None) -> str | None:
    """`source_dir`, else the image folder the run was trained on (holdout.json), else None."""
    if source_dir is not None:
        return source_dir
    path = Path(run_dir) / "holdout.json"
    return json.loads(path.read_text()).get("source_dir") if path.exists() else None
