"""Localising defects with a trained model: images in batches over a device mesh, tiles of images
of any size, and the projection's trajectory (docs/method.md, Projection and Anomaly maps).

Two maps per image, as in the paper's table, both from the same trained model: "recon" =
mean_c |x0 - f(x0)| (the plain autoencoder) and "grad" = mean_c |x_T - x0| (the projection,
paper eq. 4).
"""
from __future__ import annotations

import functools
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from iepjax import calibrated_maps, distributed, sharding
from iepjax.anomaly_maps import recon_map
from iepjax.config import MapConfig, ProjectionConfig, join_traced, split_traced
from iepjax.data.preprocess import Preprocess, model_inputs, resize_images, resize_map, stitch
from iepjax.energy import reconstruct
from iepjax.projection import check_images, scan_parts


class Localization(NamedTuple):
    """Per-image outputs over a split of N images (H, W, C).

    grad_maps, recon_maps: (N, H, W) float32; x_T, recon: (N, H, W, C) float32 in [0, 1];
    energies: (N, T) energy per step; compile_s / run_s: first-batch and total wall time;
    first_share: the share of the model inputs (images or tiles) in the first batch, whose time
    includes the compile (1.0: all of them, no steady-state time).
    """

    grad_maps: np.ndarray
    recon_maps: np.ndarray
    x_T: np.ndarray
    recon: np.ndarray
    energies: np.ndarray
    compile_s: float
    run_s: float
    first_share: float = 1.0


def _recon_batch(params: dict, x0_BxHxWxC: jax.Array, config: ProjectionConfig) -> tuple[jax.Array, jax.Array]:
    """(f(x0) (B, H, W, C), recon maps (B, H, W)) of a batch; jitted by `sharding.run_batched`."""
    f = jax.vmap(reconstruct, in_axes=(None, 0, None))(params, x0_BxHxWxC, config)
    m = jax.vmap(recon_map, in_axes=(None, 0, None))(params, x0_BxHxWxC, config)
    return f, m


def localize(params: dict, images_NxHxWxC: np.ndarray, config: ProjectionConfig, *,
             batch_size: int = 16, progress: bool = True, mesh=None) -> Localization:
    """Project uint8 images (N, H, W, C) in fixed-size batches (the last one padded: one compile).

    Each batch is split over the devices of `mesh` (`iepjax.sharding.make_mesh`; default: one
    device per process), `batch_size` rounded up to a multiple of the local device count. With
    several processes (`iepjax.distributed`) every process passes all N images, projects its own
    share and gets all N results back. The results equal the one-device ones up to float rounding.
    """
    images = np.asarray(images_NxHxWxC)
    n_all = len(images)
    if n_all == 0:
        raise ValueError("no images to localise")
    check_images(images[:1].astype(np.float32) / 255.0, config)
    mesh = sharding.make_mesh(1) if mesh is None else mesh
    rows, _ = distributed.process_rows(n_all)
    images, n = images[rows], len(rows)
    params = sharding.replicate(params, mesh)
    local = sharding.local_size(mesh)
    batch_size = -(-min(batch_size, n) // local) * local
    outs: list[tuple] = []
    bar = None
    if progress and distributed.is_main():
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
            res = sharding.project_sharded(params, xb, config, mesh)
            f, rmap = sharding.run_batched(_recon_batch, params, xb, config, mesh)
            outs.append(tuple(a[:real] for a in (res.maps, rmap, res.x_T, f, res.energies)))
            if i == 0:
                compile_s = time.perf_counter() - t0
            if bar is not None:
                bar.update(real)
    finally:
        if bar is not None:
            bar.close()
    cat = distributed.gather_rows([np.concatenate(parts) for parts in zip(*outs)], n_all)  # every share, in order
    return Localization(*cat, compile_s=compile_s, run_s=time.perf_counter() - t0, first_share=min(batch_size, n) / n)


class Localized(NamedTuple):
    """Result of `localize_images`.

    view_images: (N, size, size, C) uint8 (the inputs resized, for pictures);
    loc: a `Localization` at the view size (maps, x_T, f(x0) resized from the stitched
    working-resolution outputs; energies averaged over an image's tiles);
    maps: {"grad", "recon"} -> list of (H_i, W_i) float32 maps at each image's original size.
    """

    view_images: np.ndarray
    loc: Localization
    maps: dict


def localize_images(params: dict, config: ProjectionConfig, images: np.ndarray | Sequence[np.ndarray],
                    prep: Preprocess, *, batch_size: int = 16, progress: bool = True, mesh=None) -> Localized:
    """Project images of any size the way `prep` says (objects resized, textures tiled at the
    training scale, overlapping tiles blended: `iepjax.data.preprocess`); maps at the original
    sizes and a model-size view."""
    inputs, layouts = model_inputs(images, prep)
    loc = localize(params, inputs, config, batch_size=batch_size, progress=progress, mesh=mesh)
    s = prep.size
    view = {"grad_maps": [], "recon_maps": [], "x_T": [], "recon": []}
    maps = {"grad": [], "recon": []}
    energies = []
    for lay in layouts:
        for row, field in (("grad", "grad_maps"), ("recon", "recon_maps")):
            work = stitch(getattr(loc, field), lay)
            maps[row].append(resize_map(work, lay.orig_hw))
            view[field].append(resize_map(work, (s, s)))
        for field in ("x_T", "recon"):
            view[field].append(resize_map(stitch(getattr(loc, field), lay), (s, s)))
        energies.append(np.asarray(loc.energies[lay.start:lay.start + len(lay.positions)]).mean(0))
    view_loc = Localization(**{k: np.stack(v) for k, v in view.items()},
                            energies=np.stack(energies), compile_s=loc.compile_s, run_s=loc.run_s,
                            first_share=loc.first_share)
    return Localized(resize_images(images, s), view_loc, maps)


def calibrate_maps(res: Localized | Localization, images, fits: dict | None, cfg: MapConfig):
    """The maps of `res` replaced by the map `cfg` asks for (docs/method.md, Normal-calibrated maps).

    "paper": `res` unchanged. "nce": each raw map (the projection run with smoothing_sigma 0)
    and its image go through `calibrated_maps.nce_map` with `fits` ({"grad", "recon"} ->
    `calibrated_maps.fit_normal` tables): a `Localized`'s maps at each image's original size,
    with `images` at that size, its model-size view resized from them; a `Localization`'s maps
    (N, H, W) with `images` (N, H, W, C) at the same size.
    """
    if cfg.kind == "paper":
        return res
    if fits is None:
        raise ValueError("the nce map needs tables fitted on held-out normal images")
    if isinstance(res, Localized):
        maps = {row: calibrated_maps.nce_maps(fits[row], res.maps[row], images, cfg) for row in ("grad", "recon")}
        s = res.view_images.shape[1]
        view = {f"{row}_maps": np.stack([resize_map(a, (s, s)) for a in maps[row]]) for row in maps}
        return res._replace(loc=res.loc._replace(**view), maps=maps)
    return res._replace(**{f"{row}_maps": np.stack(calibrated_maps.nce_maps(fits[row], getattr(res, f"{row}_maps"),
                                                                            images, cfg))
                           for row in ("grad", "recon")})


@functools.partial(jax.jit, static_argnames=("config", "frames"))
def _trajectory(params: dict, x0_BxHxWxC: jax.Array, config: ProjectionConfig, values: dict, frames: int) -> jax.Array:
    config = join_traced(config, values)  # a compile key of `split_traced` and its traced values
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
    return np.asarray(_trajectory(params, jnp.asarray(x0_BxHxWxC), *split_traced(config), frames=frames))
