"""Anomaly maps: per-pixel scores from a projection or a reconstruction (docs/method.md, Anomaly maps).

grad map:  A(x0) = mean_c |x_T - x0|        (paper, Sec. 3: the difference the projection made; every "-grad" row)
recon map, the plain row of each model (paper Table 1):
    VAE:     A(x0) = mean_c |x0 - f(x0)|
    AE-L2:   A(x0) = mean_c (x0 - f(x0))^2   (per-pixel squared error)
    AE-SSIM: A(x0) = mean_c (1 - SSIM(x0, f(x0)))   (Bergmann et al. 2018's residual map)
all optionally smoothed by a Gaussian of std `sigma` pixels.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from iepjax.config import ProjectionConfig
from iepjax.energy import reconstruct
from iepjax.losses import ssim_map


def gaussian_kernel(sigma: float) -> jax.Array:
    """Normalised 1-D Gaussian kernel of std `sigma`, radius ceil(3 sigma); shape (2r+1,)."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    k = jnp.exp(-0.5 * jnp.square(t / sigma))
    return k / jnp.sum(k)


def gaussian_smooth(map_HxW: jax.Array, sigma: float) -> jax.Array:
    """Separable Gaussian blur of one map (H, W) with reflect padding; sigma=0 returns it unchanged."""
    if sigma <= 0:
        return map_HxW
    k = gaussian_kernel(sigma)
    r = (k.shape[0] - 1) // 2
    h = jnp.pad(map_HxW, r, mode="reflect") if min(map_HxW.shape) > r else jnp.pad(map_HxW, r, mode="edge")
    h = jax.vmap(lambda row: jnp.convolve(row, k, mode="valid"))(h)
    h = jax.vmap(lambda col: jnp.convolve(col, k, mode="valid"), in_axes=1, out_axes=1)(h)
    return h


def difference_map(a_HxWxC: jax.Array, b_HxWxC: jax.Array, sigma: float = 0.0) -> jax.Array:
    """mean over channels of |a - b|, then Gaussian-smoothed: (H, W, C) x 2 -> (H, W)."""
    return gaussian_smooth(jnp.mean(jnp.abs(a_HxWxC - b_HxWxC), axis=-1), sigma)


def residual_map(x0_HxWxC: jax.Array, f_HxWxC: jax.Array, likelihood: str, sigma: float = 0.0) -> jax.Array:
    """The plain row's map of one image from x0 and f(x0), (H, W, C) x 2 -> (H, W), smoothed by `sigma`:
    squared error for AE-L2 ("l2"), 1 - SSIM for AE-SSIM ("ssim"), |x0 - f| for the VAE (any other),
    each a mean over channels (module docstring)."""
    if likelihood == "l2":
        m = jnp.mean(jnp.square(x0_HxWxC - f_HxWxC), axis=-1)
    elif likelihood == "ssim":
        m = jnp.mean(1.0 - ssim_map(x0_HxWxC, f_HxWxC), axis=-1)
    else:
        m = jnp.mean(jnp.abs(x0_HxWxC - f_HxWxC), axis=-1)
    return gaussian_smooth(m, sigma)


def recon_map(params: dict, x0_HxWxC: jax.Array, config: ProjectionConfig) -> jax.Array:
    """The plain row's anomaly map of one image (H, W, C) -> (H, W): `residual_map` of x0 and f(x0)
    for the model of `config` (VAE: mean_c |x0 - f(x0)|)."""
    f = reconstruct(params, x0_HxWxC, config)
    return residual_map(x0_HxWxC, f, config.model.likelihood, config.smoothing_sigma)
