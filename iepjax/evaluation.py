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
from iepjax.atomic import dumps_json
from iepjax.config import ProjectionConfig, to_dict
from iepjax.energy import energy, reconstruct
from iepjax.projection import check_images, project_fn, scan_parts
from iepjax.runs import atomic_write_bytes, atomic_write_text, model_config


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
             batch_size: int = 16, progress: bool = True, mesh=None) -> Localization:
    """Project uint8 images (N, H, W, C) in fixed-size batches (the last one padded: one compile).

    `mesh` (issue 6, `iepjax.sharding.make_mesh`): split each batch over the mesh's devices
    (`batch_size` rounded up to a multiple of the device count). With several processes
    (`iepjax.distributed`) every process passes all N images, projects its own share and gets
    all N results back. The results equal the single-device ones up to float rounding.
    """
    images = np.asarray(images_NxHxWxC)
    n = len(images)
    if n == 0:
        raise ValueError("no images to localise")
    check_images(images[:1].astype(np.float32) / 255.0, config)
    # --- issue 6: sharded / multi-process projection
    n_all = n
    if mesh is not None:
        from iepjax import distributed, sharding
        rows, _ = distributed.process_rows(n_all)
        images, n = images[rows], len(rows)
        params = sharding.replicate(params, mesh)
        batch_size = -(-min(batch_size, n) // sharding.local_size(mesh)) * sharding.local_size(mesh)
        progress = progress and distributed.is_main()
    # --- end issue 6
    batch_size = min(batch_size, n) if mesh is None else batch_size
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
            if mesh is None:
                res = project_fn(params, xb, config)
                f, rmap = _recon_batch(params, jnp.asarray(xb), config)
                got = jax.device_get((res.maps, rmap, res.x_T, f, res.energies))
            else:  # issue 6: the batch split over the mesh; this process's rows back
                res = sharding.project_sharded(params, xb, config, mesh)
                f, rmap = sharding.run_batched(_recon_batch, params, xb, config, mesh)
                got = (res.maps, rmap, res.x_T, f, res.energies)
            outs.append(tuple(a[:real] for a in got))
            if i == 0:
                compile_s = time.perf_counter() - t0
            if bar is not None:
                bar.update(real)
    finally:
        if bar is not None:
            bar.close()
    cat = [np.concatenate(parts) for parts in zip(*outs)]
    if mesh is not None:  # issue 6: every process's share, back in order
        cat = distributed.gather_rows(cat, n_all)
    return Localization(*cat, compile_s=compile_s, run_s=time.perf_counter() - t0)


def score(maps_NxHxW: np.ndarray, masks_NxHxW: np.ndarray, labels_N: np.ndarray) -> dict:
    """pixel AUROC, image AUROC (max of map), AU-PRO@0.3 of one set of maps (method.md, Evaluation)."""
    if not any(np.any(m) for m in masks_NxHxW):  # issue 3: no ground-truth masks at all -> pixel metrics NaN
        masks_NxHxW = [None] * len(labels_N)
    return metrics.evaluate(maps_NxHxW, masks_NxHxW, labels_N)


def write_outputs(out_dir: Path, loc: Localization, masks: np.ndarray, labels: np.ndarray,
                  ids: list[str], defect_types: list[str], images: np.ndarray, config: ProjectionConfig,
                  ) -> dict:
    """Write metrics.json, maps.npz (raw float maps), the projection config and timing; return the metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"recon": score(loc.recon_maps, masks, labels), "grad": score(loc.grad_maps, masks, labels)}
    atomic_write_text(out_dir / "metrics.json", dumps_json(result))  # strict JSON: NaN -> null
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


QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0)


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


def calibrate(params: dict, config: ProjectionConfig, normal_images: np.ndarray, *, batch_size: int = 16,
              progress: bool = True, pixel_quantile: float = 0.995, image_quantile: float = 0.99,
              prep=None, mesh=None, timing: dict | None = None) -> dict:
    """Project held-out normal images (M, H, W, C) uint8 and fit thresholds: {"grad", "recon"} -> NormalStats.

    `timing`: if given, receives "compile_s" (the first batch's time, which compiles the projection).

    With `prep` (an `iepjax.data.preprocess.Preprocess`), the images may have any size and go
    through it (objects resized, textures tiled) as the test images do; maps at the model size.
    """
    if prep is not None:  # issue 3: the same preprocessing as the test images
        from iepjax import protocol
        normal = protocol.localize_images(params, config, normal_images, prep, batch_size=batch_size,
                                          progress=progress, mesh=mesh).loc
    else:
        normal = localize(params, normal_images, config, batch_size=batch_size, progress=progress, mesh=mesh)
    if timing is not None:
        timing["compile_s"] = normal.compile_s
    kw = dict(pixel_quantile=pixel_quantile, image_quantile=image_quantile)
    return {"grad": normal_stats(normal.grad_maps, **kw), "recon": normal_stats(normal.recon_maps, **kw)}


def load_or_calibrate(run_dir: Path, params: dict, config: ProjectionConfig, normal_images: np.ndarray,
                      **kwargs) -> tuple[dict, bool]:
    """Thresholds stored in run_dir/thresholds.json for this projection config, else fitted and stored.

    Returns ({"grad", "recon"} -> NormalStats, the calibration pass's compile seconds if they were
    computed now, else None).
    """
    from iepjax.data.preprocess import Preprocess
    path = Path(run_dir) / "thresholds.json"
    want = {"projection": to_dict(config), "pixel_quantile": kwargs.get("pixel_quantile", 0.995),
            "image_quantile": kwargs.get("image_quantile", 0.99), "n_images": len(normal_images)}
    prep = Preprocess.load(run_dir)  # issue 3: runs that store their preprocessing
    if prep is not None:
        want["preprocess"] = prep.to_dict()
        kwargs["prep"] = prep
    if path.exists():
        stored = json.loads(path.read_text())
        if {k: stored.get(k) for k in want} == want:
            return {k: NormalStats(**stored[k]) for k in ("grad", "recon")}, None
    timing: dict = {}
    stats = calibrate(params, config, normal_images, timing=timing, **kwargs)
    if jax.process_index() == 0:  # issue 6: with several processes, process 0 writes
        atomic_write_text(path, json.dumps({**want, **{k: v._asdict() for k, v in stats.items()}}, indent=2))
    return stats, timing["compile_s"]


def _rates(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray, pixel_t: float, image_t: float) -> dict:
    """F1 and false-positive rates of the thresholded maps (pixel: map >= t; image: max >= t)."""
    img = metrics.image_scores(maps)
    good = labels == 0
    out = {"image_f1": metrics.f1_at_threshold(img, labels, image_t),
           "pixel_f1": metrics.f1_at_threshold(np.asarray(maps).ravel(), np.asarray(masks).ravel(), pixel_t),
           "pixel_fpr_good_test": float(np.mean(maps[good] >= pixel_t)) if good.any() else float("nan"),
           "image_fpr_good_test": float(np.mean(img[good] >= image_t)) if good.any() else float("nan")}
    return out


def evaluate(params: dict, config: ProjectionConfig, test, thresholds: dict, out_dir: Path, *,
             batch_size: int = 16, overlays: bool = True, progress: bool = True,
             threshold_source: str = "held-out normal training images", loc: Localization | None = None,
             official: dict | None = None, compiled_in_calibration: float | None = None) -> dict:
    """Localise a labelled split; write metrics.json, thresholds.json, scores.csv, maps, pictures and index.html.

    `test`: an `iepjax.data.Split`; `thresholds`: {"grad", "recon"} -> NormalStats (from
    `load_or_calibrate`, or with thresholds given by the user). Returns the metrics dict.
    `loc`: the split's localisation if already computed; `official`: metrics of the official
    protocol (`iepjax.protocol.official_metrics`, original-size maps) that replace the model-size
    ones in the rows (those are kept under "model_size"). `compiled_in_calibration`: the compile
    seconds of a threshold calibration run just before in this process (the test pass then reuses
    the compiled program), reported as the compile time.
    """
    from iepjax import report, visualize

    out_dir = Path(out_dir)
    if loc is None:
        loc = localize(params, test.images, config, batch_size=batch_size, progress=progress)
    result = write_outputs(out_dir, loc, test.masks, test.labels, test.ids, test.defect_types, test.images, config)
    if official is not None:  # issue 3: the official protocol's numbers are the ones reported
        result["model_size"] = {row: dict(result[row]) for row in ("recon", "grad")}
        for row in ("recon", "grad"):
            result[row].update(official[row])
        result["protocol"] = official["protocol"]
        result["per_kind"] = official["per_kind"]
    for row, maps in (("grad", loc.grad_maps), ("recon", loc.recon_maps)):
        st = thresholds[row]
        result[row].update(_rates(maps, test.masks, test.labels, st.pixel_threshold, st.image_threshold))
        result[row]["pixel_threshold"] = st.pixel_threshold
        result[row]["image_threshold"] = st.image_threshold
    result["thresholds"] = {"source": threshold_source, "pixel_quantile": thresholds["grad"].pixel_quantile,
                            "image_quantile": thresholds["grad"].image_quantile,
                            "n_normal_images": thresholds["grad"].n_images}
    n_steady = len(test.images) - min(batch_size, len(test.images))
    result["timing"] = {"compile_s": round(loc.compile_s, 2), "total_s": round(loc.run_s, 2),
                        "steady_img_per_s": (round(n_steady / max(loc.run_s - loc.compile_s, 1e-9), 3)
                                             if n_steady else None)}
    if compiled_in_calibration is not None:  # the first test batch found the program compiled
        result["timing"].update(compile_s=round(compiled_in_calibration, 2), compiled_in="threshold calibration",
                                first_batch_s=round(loc.compile_s, 2))
    atomic_write_text(out_dir / "metrics.json", dumps_json(result))  # strict JSON: NaN -> null
    # the thresholds used here, kept with the projection: run_dir/thresholds.json holds one projection
    # config's and is refitted (overwritten) when another config is projected or calibrated
    atomic_write_text(out_dir / "thresholds.json", json.dumps(
        {"source": threshold_source, "projection": to_dict(config),
         **{row: thresholds[row]._asdict() for row in ("grad", "recon")}}, indent=2))
    g = thresholds["grad"]
    img_scores = metrics.image_scores(loc.grad_maps)
    report.write_scores_csv(out_dir / "scores.csv", test.ids, test.defect_types, img_scores, test.labels,
                            g.image_threshold)
    visualize.energy_curve(out_dir / "energy.png", loc.energies, test.labels)
    visualize.roc_curves(out_dir / "roc.png", {"grad": loc.grad_maps, "recon": loc.recon_maps}, test.masks)
    picks = report.pick_cases(img_scores, test.labels)
    traj = trajectory(params, test.images[picks["strip"]].astype(np.float32) / 255.0, config)
    visualize.trajectory_strip(out_dir / "trajectory.png", traj, [test.ids[i] for i in picks["strip"]])
    if overlays:
        visualize.write_overlays(out_dir / "overlays", test.images, loc, test.masks, test.ids,
                                 test.defect_types, g.vmax, g.pixel_threshold)
    report.write_html(out_dir, result, test.ids, test.defect_types, img_scores, test.labels, picks, overlays)
    return result


@functools.partial(jax.jit, static_argnames=("config", "frames"))
def _trajectory(params: dict, x0_BxHxWxC: jax.Array, config: ProjectionConfig, frames: int) -> jax.Array:
    every = max(config.steps // max(frames - 1, 1), 1)

    def one(x0):
        init, step = scan_parts(params, x0, config)

        def body(c, _):
            c, _ = step(c)
            return c, c.x
        _, xs = jax.lax.scan(body, init, None, length=config.steps)
        return jnp.concatenate([x0[None], xs[every - 1::every]])[:frames]

    return jax.vmap(one)(x0_BxHxWxC)


def trajectory(params: dict, x0_BxHxWxC: np.ndarray, config: ProjectionConfig, frames: int = 6) -> np.ndarray:
    """x_t at `frames` evenly spaced iterations (t = 0 first) for a few images: (B, frames, H, W, C).

    The same scan body as `project_fn` (`projection.scan_parts`), so the last frame is (up to the spacing) x_T.
    """
    if config.steps == 0 or len(x0_BxHxWxC) == 0:
        return np.asarray(x0_BxHxWxC)[:, None]
    return np.asarray(_trajectory(params, jnp.asarray(x0_BxHxWxC), config, frames))


def project_run(run_dir: Path, dataset: str, category: str, config: ProjectionConfig | None = None, *,
                data_dir: str | None = None, batch_size: int = 16, overlays: bool = True, progress: bool = True,
                pixel_threshold: float | None = None, image_threshold: float | None = None,
                pixel_quantile: float = 0.995, image_quantile: float = 0.99,
                source_dir: str | None = None, mesh=None, early_stop: bool = True) -> tuple[Path, dict]:
    """Evaluate a trained run on the test split: writes run_dir/projections/v<N>/; returns (folder, metrics).

    `config` defaults to the category preset's projection settings with the run's model; with
    `early_stop` and no `config.stop_loss`, images stop at the smallest loss of the run's held-out
    normal images (`with_early_stop`). The
    thresholds come from the run's held-out normal images (fitted once per projection config and
    stored in run_dir/thresholds.json) unless `pixel_threshold` / `image_threshold` are given.
    Runs with a preprocess.json (all runs of `training.train_run`) are evaluated with the official
    protocol (`iepjax.protocol`): maps at each test image's original size, written as TIFF under
    anomaly_maps/<row>/<category>/test/<defect>/<id>.tiff. `source_dir`: the image folder / MVTec AD
    download (default: the one the run was trained on).
    `mesh` (issue 6): split the projection over its devices (`localize`); with several processes
    (`iepjax.distributed`) each projects its share and process 0 writes everything, the other
    processes return (None, {}).
    """
    import dataclasses

    from iepjax import data, distributed, runs
    from iepjax.data.preprocess import resize_images, resize_masks
    from iepjax.training import load_params

    params, tcfg = load_params(run_dir)
    config = dataclasses.replace(config or default_projection_config(dataset, category, tcfg.model), model=tcfg.model)
    size = config.model.size
    normal = distributed.main_first(  # issue 6: process 0 prepares the data set, then the others read it
        lambda: held_out_images(run_dir, dataset, category, data_dir, source_dir=source_dir))
    from iepjax.data.preprocess import Preprocess
    prep = Preprocess.load(run_dir)  # None for runs without preprocess.json (model-size images)
    if early_stop and config.stop_loss is None:
        config = with_early_stop(params, config, normal, prep)
    thresholds, cal_compile_s = load_or_calibrate(run_dir, params, config, normal,
                                      batch_size=batch_size, progress=progress, mesh=mesh,
                                      pixel_quantile=pixel_quantile, image_quantile=image_quantile)
    source = "held-out normal training images"
    if pixel_threshold is not None or image_threshold is not None:
        source = "given by the user" + ("" if (pixel_threshold is not None and image_threshold is not None)
                                        else " (the other from held-out normal training images)")
        for row in thresholds:
            thresholds[row] = thresholds[row]._replace(
                pixel_threshold=thresholds[row].pixel_threshold if pixel_threshold is None else pixel_threshold,
                image_threshold=thresholds[row].image_threshold if image_threshold is None else image_threshold)
    if prep is not None:  # issue 3: the official protocol at the original image sizes
        from iepjax import protocol
        test = data.load_split(dataset, category, "test", data_dir, source_dir=_run_source(run_dir, source_dir),
                               progress=progress)
        res = protocol.localize_images(params, config, test.images, prep, batch_size=batch_size, progress=progress,
                                       mesh=mesh)
        if not distributed.is_main():  # issue 6
            return None, {}
        official = protocol.official_metrics(res.maps, test)
        protocol.warn_skipped(official)
        with runs.new_output(Path(run_dir) / "projections") as out:  # complete or absent (iepjax.atomic)
            official["protocol"]["tiff_maps"] = {row: str(out.final / Path(root).relative_to(out.path)) for row, root
                                                 in protocol.write_maps(out.path, category, test, res.maps).items()}
            result = evaluate(params, config, protocol.view_split(test, res.view_images, size), thresholds, out.path,
                              batch_size=batch_size, overlays=overlays, progress=progress, threshold_source=source,
                              loc=res.loc, official=official, compiled_in_calibration=cal_compile_s)
        return out.final, result
    test = data.load_split(dataset, category, "test", data_dir)
    test = test._replace(images=resize_images(test.images, size), masks=resize_masks(test.masks, size))
    loc = localize(params, test.images, config, batch_size=batch_size, progress=progress, mesh=mesh)
    if not distributed.is_main():  # issue 6
        return None, {}
    with runs.new_output(Path(run_dir) / "projections") as out:  # complete or absent (iepjax.atomic)
        result = evaluate(params, config, test, thresholds, out.path, batch_size=batch_size, overlays=overlays,
                          progress=progress, threshold_source=source, loc=loc, compiled_in_calibration=cal_compile_s)
    return out.final, result


@functools.partial(jax.jit, static_argnames="config")
def _model_losses(params: dict, x_BxHxWxC: jax.Array, config: ProjectionConfig) -> jax.Array:
    """L_r(x) of each image of a batch (B,): the energy at x0 = x, where the prior is 0."""
    return jax.vmap(lambda x: energy(params, x, x, config)[0])(x_BxHxWxC)


def with_early_stop(params: dict, config: ProjectionConfig, normal_images, prep=None, *,
                    batch_size: int = 64) -> ProjectionConfig:
    """`config` with stop_loss = the smallest L_r of held-out normal images (method.md: a port stops
    once L_r falls below the smallest training loss): a projected image stops once it is as likely
    under the model as the most likely normal image.

    normal_images: uint8 images, preprocessed with `prep` (tiled / resized as the test images are;
    None: already at the model size). Raises FloatingPointError when a loss is not finite (a
    diverged model), which no stopping rule can use.
    """
    import dataclasses

    from iepjax.data.preprocess import model_inputs
    x = model_inputs(normal_images, prep)[0] if prep is not None else np.asarray(normal_images)
    cfg = dataclasses.replace(config, stop_loss=None)
    losses = [np.asarray(_model_losses(params, jnp.asarray(x[i:i + batch_size], jnp.float32) / 255.0, cfg))
              for i in range(0, len(x), batch_size)]
    losses = np.concatenate(losses)
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError(
            f"the model's loss is not finite on {int(np.sum(~np.isfinite(losses)))} of {len(losses)} held-out normal "
            "images: the trained model is unusable (it diverged or collapsed); train it again (another --lr or --seed)")
    return dataclasses.replace(config, stop_loss=float(np.min(losses)))


def default_projection_config(dataset: str, category: str, model) -> ProjectionConfig:
    """The category preset's projection settings for a model (alpha and lam for its likelihood)."""
    from iepjax.presets import projection_preset
    pre = projection_preset(dataset, category, model.likelihood)
    return ProjectionConfig(model=model, steps=pre["proj_steps"], alpha=pre["alpha"], lam=pre["lam"],
                            smoothing_sigma=pre["smoothing_sigma"])


def held_out_images(run_dir: Path, dataset: str, category: str, data_dir: str | None = None, *,
                    source_dir: str | None = None) -> np.ndarray:
    """The run's held-out normal training images (ids in run_dir/holdout.json) at the model size.

    Runs with a preprocess.json (issue 3) get the images at their original size (a list when sizes
    differ): `load_or_calibrate` preprocesses them as the test images are.
    """
    from iepjax import data
    from iepjax.data.preprocess import Preprocess, resize_images

    ids = json.loads((Path(run_dir) / "holdout.json").read_text())["ids"]
    if not ids:
        raise ValueError(f"{run_dir} has no held-out normal images to fit thresholds on: retrain with --holdout > 0")
    train = data.load_split(dataset, category, "train", data_dir, source_dir=_run_source(run_dir, source_dir),
                            progress=False)
    index = {id_: i for i, id_ in enumerate(train.ids)}
    picked = [train.images[index[i]] for i in ids]
    if Preprocess.load(run_dir) is not None:
        return np.stack(picked) if all(p.shape == picked[0].shape for p in picked) else picked
    return resize_images(picked, model_config(run_dir)["size"])


def _run_source(run_dir: Path, source_dir: str | None) -> str | None:
    """`source_dir`, else the image folder the run was trained on (holdout.json), else None."""
    if source_dir is not None:
        return source_dir
    path = Path(run_dir) / "holdout.json"
    return json.loads(path.read_text()).get("source_dir") if path.exists() else None


def format_table(result: dict) -> str:
    """The metrics as a small text table (rows recon and grad)."""
    lines = [f"{'map':<6} {'pixel AUROC':>12} {'image AUROC':>12} {'AU-PRO@0.3':>11}"]
    for row in ("recon", "grad"):
        r = result[row]
        lines.append(f"{row:<6} {r['pixel_auroc']:>12.4f} {r['image_auroc']:>12.4f} {r['pixel_aupro']:>11.4f}")
    if result.get("per_kind"):
        lines.append("pixel AUROC by defect kind (with the good images), recon -> grad: " + ", ".join(
            f"{kind} {k['recon']['pixel_auroc']:.3f} -> {k['grad']['pixel_auroc']:.3f}"
            for kind, k in result["per_kind"].items()))
    return "\n".join(lines)
