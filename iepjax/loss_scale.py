"""Projection settings in units of the trained model's own loss (docs/method.md, Projection: scales).

The update x <- x - alpha * grad E(x) * (x - f(x))^2 and the prior lam ||x - x0||_1 act on the
scale of the model's loss L_r: multiply L_r by c and the same alpha takes c times longer steps,
while the same lam holds c times fewer pixels at x0. With the Gaussian likelihood, for example,
grad L_r ~ (x - f) / gamma^2, so constants chosen for one gamma^2 mean something else for every
other model and dataset. Here both are stated in units measured on the run's held-out normal
images (never on test images, never with labels):

- `hold`: the fraction of normal pixels that the prior holds at x0 at the first step. A pixel at
  x0 leaves it only where |dL_r/dx| > lam (the least-magnitude subgradient, `projection.
  descent_direction`), so lam = the `hold`-quantile of |dL_r/dx(x0)| over normal pixels.
- `step`: the first step, in intensity units, of a normal pixel whose gradient and weighting are
  typical: alpha = step / (rms(dL_r/dx(x0)) * mean((x0 - f(x0))^2)) over normal pixels.

Multiplying L_r by c multiplies every gradient by c, so the resolved lam by c and alpha by 1/c:
the projection's trajectory is unchanged (tested). The settings live on the config
(`ProjectionConfig.step` / `hold`); `resolve` turns them into alpha and lam.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from iepjax.config import ProjectionConfig, split_traced
from iepjax.energy import energy
from iepjax.sharding import fixed_batches


class LossScale(NamedTuple):
    """The model's loss scale on normal pixels (float scalars).

    grad_rms: root mean square of dL_r/dx at x0.
    weight_mean: mean of the weighting (x0 - f(x0))^2.
    grad_abs_quantile: the `hold`-quantile of |dL_r/dx(x0)| (the resolved lam).
    """

    grad_rms: float
    weight_mean: float
    grad_abs_quantile: float


def _gradient_and_weight(params: dict, x0_HxWxC: jax.Array, config: ProjectionConfig) -> tuple[jax.Array, jax.Array]:
    """(dL_r/dx, (x - f(x))^2) at x = x0 for one image (H, W, C) each; L_r = E with lam 0."""
    cfg = dataclasses.replace(config, lam=0.0, stop_loss=None)
    # one forward pass: the energy's by-products hold f(x0) (as `projection.descent_direction` uses them)
    g, aux = jax.grad(energy, argnums=1, has_aux=True)(params, x0_HxWxC, x0_HxWxC, cfg)
    return g, jnp.square(x0_HxWxC - aux.recon_image)


@functools.partial(jax.jit, static_argnames="config")
def _batch_gradient_and_weight(params: dict, x0_BxHxWxC: jax.Array, config: ProjectionConfig):
    return jax.vmap(_gradient_and_weight, in_axes=(None, 0, None))(params, x0_BxHxWxC, config)


def measure(params: dict, config: ProjectionConfig, normal_x0_NxHxWxC: np.ndarray, hold: float, *,
            batch_size: int = 32) -> LossScale:
    """The loss scale of `config.model`'s loss on normal images (N, H, W, C), float in [0, 1].

    Only normal images enter: the function has no labels, masks or test images to receive.
    """
    x = np.asarray(normal_x0_NxHxWxC, np.float32)
    if x.ndim != 4 or len(x) == 0:
        raise ValueError(f"expected normal images shaped (N, H, W, C) with N >= 1, got {x.shape}")
    grads, weights = [], []
    key, _ = split_traced(config)  # the measurement does not read alpha, lam or stop_loss: one program for all
    for xb, real in fixed_batches(x, batch_size):
        g, w = _batch_gradient_and_weight(params, jnp.asarray(xb), key)
        grads.append(np.asarray(g, np.float64)[:real])
        weights.append(np.asarray(w, np.float64)[:real])
    g, w = np.concatenate(grads), np.concatenate(weights)
    if not (np.isfinite(g).all() and np.isfinite(w).all()):
        raise ValueError("the model's loss gradient is not finite on the normal images: the run diverged")
    return LossScale(float(np.sqrt(np.mean(np.square(g)))), float(np.mean(w)), float(np.quantile(np.abs(g), hold)))


def resolve(params: dict, config: ProjectionConfig, normal_x0_NxHxWxC: np.ndarray, *,
            batch_size: int = 32) -> tuple[ProjectionConfig, dict | None]:
    """`config` with its `step` / `hold` resolved into alpha / lam on normal images, and a JSON-ready record.

    lam = quantile_hold |dL_r/dx(x0)|,  alpha = step / (rms dL_r/dx(x0) * mean (x0 - f(x0))^2)
    (without the weighting, `config.weighting` False: alpha = step / rms dL_r/dx(x0)), both over
    the pixels of the normal images (N, H, W, C), float in [0, 1]. The returned config has `step`
    and `hold` None (`ProjectionConfig.resolved`); the rest is kept. A config with neither is
    returned as it is, with the record None.
    """
    if config.resolved:
        return config, None
    hold = 0.5 if config.hold is None else config.hold
    scale = measure(params, dataclasses.replace(config, step=None, hold=None), normal_x0_NxHxWxC, hold,
                    batch_size=batch_size)
    alpha, lam = config.alpha, config.lam
    if config.step is not None:
        denom = scale.grad_rms * (scale.weight_mean if config.weighting else 1.0)
        if not denom > 0:
            raise ValueError("the model reconstructs the normal images exactly (zero gradient or weighting): "
                             "no loss scale to resolve alpha from; give alpha and lam explicitly")
        alpha = config.step / denom
    if config.hold is not None:
        lam = scale.grad_abs_quantile
    resolved = dataclasses.replace(config, alpha=alpha, lam=lam, step=None, hold=None)
    record = {"step": config.step, "hold": config.hold, "scale": scale._asdict(),
              "alpha": resolved.alpha, "lam": resolved.lam, "n_normal_inputs": int(len(normal_x0_NxHxWxC))}  # model inputs: tiles of textures
    return resolved, record
