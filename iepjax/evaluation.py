"""Localise defects in a dataset split with a trained run and score the maps (paper, Sec. 4).

Two rows, as in the paper's table: "recon" = the plain autoencoder map mean_c |x0 - f(x0)|;
"grad" = the projection map mean_c |x_T - x0|. Both from the same trained model.
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from iepjax import metrics
from iepjax.anomaly_maps import recon_map
from iepjax.config import ProjectionConfig, to_dict
from iepjax.energy import reconstruct
from iepjax.projection import check_images, project_fn
from iepjax.runs import atomic_write_bytes, atomic_write_text


class Localization(NamedTuple):
    """Per-image outputs over a split of N images (H, W, C).

    grad_maps, recon_maps: (N, H, W) float32; x_T, recon: (N, H, W, C) float32 in [0, 1];
    energies: (N, T) energy per step; compile_s / run_s: first-batch and total wall time.
    """

    grad_maps: np.ndarray
    recon_maps: np.ndarray
    x_T: np.ndarray
    recon: np.ndarray
    energies: np.ndarray
    compile_s: float
    run_s: float


@functools.partial(jax.jit, static_argnames="config")
def _recon_batch(params: dict, x0_BxHxWxC: jax.Array, config: ProjectionConfig) -> tuple[jax.Array, jax.Array]:
    """(f(x0) (B, H, W, C), recon maps (B, H, W)) of a batch."""
    f = jax.vmap(reconstruct, in_axes=(None, 0, None))(params, x0_BxHxWxC, config)
    m = jax.vmap(recon_map, in_axes=(None, 0, None))(params, x0_BxHxWxC, config)
    return f, m


def localize(params: dict, images_NxHxWxC: np.ndarray, config: ProjectionConfig, *,
             batch_size: int = 16, progress: bool = True) -> Localization:
    """Project uint8 images (N, H, W, C) in fixed-size batches (the last one padded: one compile)."""
    images = np.asarray(images_NxHxWxC)
    n = len(images)
    if n == 0:
        raise ValueError("no images to localise")
    check_images(images[:1].astype(np.float32), config)
    batch_size = min(batch_size, n)
    outs: list[tuple] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc="project", unit="img", dynamic_ncols=True)
    t0 = time.perf_counter()
    compile_s = 0.0
    try:
        for i in range(0, n, batch_size):
            xb = images[i:i + batch_size].astype(np.float32) / 255.0
            real = len(xb)
            if real < batch_size:  # pad to one compiled shape
                xb = np.concatenate([xb, np.repeat(xb[-1:], batch_size - real, axis=0)])
            res = project_fn(params, xb, config)
            f, rmap = _recon_batch(params, jnp.asarray(xb), config)
            got = jax.device_get((res.maps, rmap, res.x_T, f, res.energies))
            outs.append(tuple(a[:real] for a in got))
            if i == 0:
                compile_s = time.perf_counter() - t0
            if bar is not None:
                bar.update(real)
    finally:
        if bar is not None:
            bar.close()
    cat = [np.concatenate(parts) for parts in zip(*outs)]
    return Localization(*cat, compile_s=compile_s, run_s=time.perf_counter() - t0)


def score(maps_NxHxW: np.ndarray, masks_NxHxW: np.ndarray, labels_N: np.ndarray) -> dict:
    """pixel AUROC, image AUROC (max of map), AU-PRO@0.3 of one set of maps (method.md, Evaluation)."""
    return metrics.evaluate(maps_NxHxW, masks_NxHxW, labels_N)


def write_outputs(out_dir: Path, loc: Localization, masks: np.ndarray, labels: np.ndarray,
                  ids: list[str], defect_types: list[str], images: np.ndarray, config: ProjectionConfig,
                  ) -> dict:
    """Write metrics.json, maps.npz (raw float maps), the projection config and timing; return the metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"recon": score(loc.recon_maps, masks, labels), "grad": score(loc.grad_maps, masks, labels)}
    atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=2))
    atomic_write_text(out_dir / "projection_config.json", json.dumps(to_dict(config), indent=2))
    atomic_write_text(out_dir / "timing.json", json.dumps(
        {"images": len(images), "steps": config.steps, "compile_s": loc.compile_s, "total_s": loc.run_s}, indent=2))
    import io
    buf = io.BytesIO()
    np.savez_compressed(buf, grad=loc.grad_maps, recon=loc.recon_maps, ids=np.asarray(ids),
                        energies=loc.energies)
    atomic_write_bytes(out_dir / "maps.npz", buf.getvalue())
    return result


class NormalStats(NamedTuple):
    """Score statistics of held-out normal images (never test images) and the thresholds they give.

    pixel_threshold / image_threshold: the `pixel_quantile` / `image_quantile` quantiles of the
    normal pixel scores / image scores (max of map); vmax: the heat-map bound (99.9th percentile
    of normal pixel scores, at least the pixel threshold) used for every image's picture.
    """

    pixel_threshold: float
    image_threshold: float
    vmax: float
    pixel_quantile: float
    image_quantile: float
    n_images: int


def normal_stats(maps_NxHxW: np.ndarray, *, pixel_quantile: float = 0.995,
                 image_quantile: float = 0.99) -> NormalStats:
    """Thresholds and picture bounds from the anomaly maps of normal images (N, H, W)."""
    maps = np.asarray(maps_NxHxW)
    if len(maps) == 0:
        raise ValueError("no normal images to fit thresholds on: hold out at least one training image")
    pt = float(np.quantile(maps, pixel_quantile))
    it = float(np.quantile(maps.reshape(len(maps), -1).max(1), image_quantile))
    vmax = max(float(np.quantile(maps, 0.999)), pt, 1e-6)
    return NormalStats(pt, it, vmax, pixel_quantile, image_quantile, len(maps))


def evaluate(params: dict, config: ProjectionConfig, test, normal_images: np.ndarray, out_dir: Path, *,
             batch_size: int = 16, overlays: bool = True, progress: bool = True,
             pixel_quantile: float = 0.995, image_quantile: float = 0.99) -> dict:
    """Localise a labelled split and the held-out normal images; write every output into out_dir.

    `test`: an `iepjax.data.Split`; `normal_images`: uint8 (M, H, W, C) held-out normal training
    images that fit the thresholds and heat-map bounds. Returns the metrics dict (metrics.json).
    """
    from iepjax import visualize

    out_dir = Path(out_dir)
    normal = localize(params, normal_images, config, batch_size=batch_size, progress=progress)
    stats = {"grad": normal_stats(normal.grad_maps, pixel_quantile=pixel_quantile, image_quantile=image_quantile),
             "recon": normal_stats(normal.recon_maps, pixel_quantile=pixel_quantile, image_quantile=image_quantile)}
    atomic_write_text(out_dir / "normal_stats.json", json.dumps({k: v._asdict() for k, v in stats.items()}, indent=2))
    loc = localize(params, test.images, config, batch_size=batch_size, progress=progress)
    result = write_outputs(out_dir, loc, test.masks, test.labels, test.ids, test.defect_types, test.images, config)
    result["timing"] = {"compile_s": round(loc.compile_s, 2), "total_s": round(loc.run_s, 2),
                        "steady_img_per_s": round(max(len(test.images) - batch_size, 1)
                                                  / max(loc.run_s - loc.compile_s, 1e-9), 3)}
    visualize.energy_curve(out_dir / "energy.png", loc.energies, test.labels)
    if overlays:
        g = stats["grad"]
        visualize.write_overlays(out_dir / "overlays", test.images, loc, test.masks, test.ids,
                                 test.defect_types, g.vmax, g.pixel_threshold)
    return result


def project_run(run_dir: Path, dataset: str, category: str, config: ProjectionConfig | None = None, *,
                data_dir: str | None = None, batch_size: int = 16, overlays: bool = True,
                progress: bool = True, **quantiles) -> tuple[Path, dict]:
    """Evaluate a trained run on the test split: writes run_dir/projections/p<N>/; returns (folder, metrics).

    `config` defaults to the category preset's projection settings with the run's model.
    """
    import dataclasses

    from iepjax import data, runs
    from iepjax.data.preprocess import resize_images, resize_masks
    from iepjax.presets import preset
    from iepjax.training import load_params

    params, tcfg = load_params(run_dir)
    if config is None:
        pre = preset(dataset, category)
        config = ProjectionConfig(model=tcfg.model, steps=pre["proj_steps"], alpha=pre["alpha"], lam=pre["lam"],
                                  smoothing_sigma=pre["smoothing_sigma"])
    config = dataclasses.replace(config, model=tcfg.model)
    train = data.load_split(dataset, category, "train", data_dir)
    holdout = json.loads((Path(run_dir) / "holdout.json").read_text())["ids"]
    if not holdout:
        raise ValueError(f"{run_dir} has no held-out normal images to fit thresholds on: retrain with --holdout > 0")
    index = {id_: i for i, id_ in enumerate(train.ids)}
    size = config.model.size
    normal = resize_images(train.images[[index[i] for i in holdout]], size)
    test = data.load_split(dataset, category, "test", data_dir)
    test = test._replace(images=resize_images(test.images, size), masks=resize_masks(test.masks, size))
    out_dir = runs.new_run(Path(run_dir) / "projections")
    result = evaluate(params, config, test, normal, out_dir, batch_size=batch_size, overlays=overlays,
                      progress=progress, **quantiles)
    return out_dir, result


def format_table(result: dict) -> str:
    """The metrics as a small text table (rows recon and grad)."""
    lines = [f"{'map':<6} {'pixel AUROC':>12} {'image AUROC':>12} {'AU-PRO@0.3':>11}"]
    for row in ("recon", "grad"):
        r = result[row]
        lines.append(f"{row:<6} {r['pixel_auroc']:>12.4f} {r['image_auroc']:>12.4f} {r['pixel_aupro']:>11.4f}")
    return "\n".join(lines)
