"""The model's own training loss, for one image (docs/method.md, Training and Models).

L(x) = L_r(x, f(x)) + KL(q(z|x) || N(0, I)), all terms summed over pixels and channels; the
autoencoders' losses (L2, SSIM) have no KL. Write the maths for one image; `jax.vmap` it over a batch.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from iepjax.config import ModelConfig


class LossTerms(NamedTuple):
    """Scalar loss terms of one image (sums over its pixels), and the total."""

    total: jax.Array
    recon: jax.Array
    kl: jax.Array


def bce_sum(logits_HxWxC: jax.Array, x_HxWxC: jax.Array) -> jax.Array:
    """Summed binary cross-entropy -sum[x log f + (1-x) log(1-f)], f = sigmoid(logits), stable form."""
    return jnp.sum(jax.nn.softplus(logits_HxWxC) - x_HxWxC * logits_HxWxC)


def gaussian_nll_sum(logits_HxWxC: jax.Array, x_HxWxC: jax.Array, log_gamma: jax.Array) -> jax.Array:
    """Gaussian negative log-likelihood, learned scalar std gamma (Dai & Wipf 2019).

    -log N(x; f, gamma^2 I) = sum (x - f)^2 / (2 gamma^2) + D log gamma + D/2 log(2 pi).
    """
    d = x_HxWxC.size
    f = jax.nn.sigmoid(logits_HxWxC)
    sq = jnp.sum(jnp.square(x_HxWxC - f))
    return sq * 0.5 * jnp.exp(-2.0 * log_gamma) + d * log_gamma + 0.5 * d * math.log(2 * math.pi)


def l2_sum(f_HxWxC: jax.Array, x_HxWxC: jax.Array) -> jax.Array:
    """The AE-L2 loss of one image: sum (x - f)^2 over pixels and channels (docs/method.md, Models)."""
    return jnp.sum(jnp.square(x_HxWxC - f_HxWxC))


# SSIM's window (Bergmann et al. 2018; Wang et al. 2004): 11 x 11 Gaussian of std 1.5, K1 0.01, K2 0.03,
# images in [0, 1].
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


@functools.cache
def _ssim_filter_matrix(n: int) -> np.ndarray:
    """(n, n) matrix G: G @ z is z (n,) padded symmetrically by 5 (numpy "symmetric", scipy's "reflect")
    then convolved 'valid' with dm_pix's 11-tap Gaussian (std 1.5), so each output is centred on its pixel."""
    hw = SSIM_WINDOW // 2
    t = np.arange(SSIM_WINDOW) - hw
    w = np.exp(-0.5 * (t / SSIM_SIGMA) ** 2)
    w /= w.sum()
    src = np.pad(np.arange(n), hw, mode="symmetric")  # padded position -> source pixel
    g = np.zeros((n, n), np.float64)
    for i in range(n):
        for k in range(SSIM_WINDOW):
            g[i, src[i + k]] += w[k]
    return g.astype(np.float32)


def _ssim_filter(z_HxWxC: jax.Array) -> jax.Array:
    """The Gaussian window of SSIM over one image (H, W, C), same size out: two small matrix products
    (fast inside the projection's loop on any backend, where a convolution would not be on XLA:CPU)."""
    gh = jnp.asarray(_ssim_filter_matrix(z_HxWxC.shape[0]))
    gw = jnp.asarray(_ssim_filter_matrix(z_HxWxC.shape[1]))
    hp = jax.lax.Precision.HIGHEST
    z = jnp.einsum("ih,hwc->iwc", gh, z_HxWxC, precision=hp)
    return jnp.einsum("jw,iwc->ijc", gw, z, precision=hp)


def ssim_map(a_HxWxC: jax.Array, b_HxWxC: jax.Array) -> jax.Array:
    """SSIM of two images (H, W, C) at every pixel and channel -> (H, W, C) (Wang et al. 2004).

    `dm_pix.ssim` (11 x 11 Gaussian window of std 1.5, K1 0.01, K2 0.03, data range 1, population
    variances) with the window centred on every pixel: the images are extended symmetrically by 5
    pixels at the borders, as scikit-image's `structural_similarity(..., full=True)` does (its
    "reflect" mode), so the map has the image's size. Per channel.
    """
    import dm_pix  # here, not at module import: only the AE-SSIM model needs it

    return dm_pix.ssim(a_HxWxC, b_HxWxC, max_val=1.0, filter_size=SSIM_WINDOW, filter_sigma=SSIM_SIGMA,
                       k1=SSIM_K1, k2=SSIM_K2, return_map=True, filter_fn=_ssim_filter)


def ssim_loss_sum(f_HxWxC: jax.Array, x_HxWxC: jax.Array) -> jax.Array:
    """The AE-SSIM loss of one image: sum over pixels and channels of 1 - SSIM(x, f) (Bergmann et al. 2018).

    The whole image's map (`ssim_map`), summed like the other losses, i.e. H*W*C * (1 - mean SSIM);
    the residual map of the plain AE-SSIM row is its channel mean (docs/method.md, Anomaly maps).
    """
    return jnp.sum(1.0 - ssim_map(x_HxWxC, f_HxWxC))


def reconstruction_loss(logits_HxWxC: jax.Array, x_HxWxC: jax.Array, log_gamma: jax.Array,
                        config: ModelConfig) -> jax.Array:
    """L_r for one image under the configured likelihood ("bce", "gaussian", "l2" or "ssim")."""
    if config.likelihood == "bce":
        return bce_sum(logits_HxWxC, x_HxWxC)
    if config.likelihood == "gaussian":
        return gaussian_nll_sum(logits_HxWxC, x_HxWxC, log_gamma)
    if config.likelihood == "l2":
        return l2_sum(jax.nn.sigmoid(logits_HxWxC), x_HxWxC)
    if config.likelihood == "ssim":
        return ssim_loss_sum(jax.nn.sigmoid(logits_HxWxC), x_HxWxC)
    raise ValueError(f"unknown likelihood {config.likelihood!r}: choose bce, gaussian, l2 or ssim")


def kl_divergence(mu_L: jax.Array, logvar_L: jax.Array) -> jax.Array:
    """KL(N(mu, exp(logvar)) || N(0, I)) = -1/2 sum(1 + logvar - mu^2 - exp(logvar))."""
    return -0.5 * jnp.sum(1.0 + logvar_L - jnp.square(mu_L) - jnp.exp(logvar_L))


def kl_free_bits(mu_L: jax.Array, logvar_L: jax.Array, free_bits: float) -> jax.Array:
    """KL(q(z|x) || N(0, I)) with a floor of `free_bits` nats on each latent dimension's term.

    sum_d max(KL_d, free_bits), KL_d = -1/2 (1 + logvar_d - mu_d^2 - exp(logvar_d)) ("free bits",
    Kingma et al. 2016, per image). Below the floor a dimension's KL has no gradient, so the encoder
    is not pushed to make q(z|x) the prior, the usual remedy for posterior collapse
    (docs/method.md, Training). free_bits = 0 is `kl_divergence`.
    """
    if free_bits <= 0:
        return kl_divergence(mu_L, logvar_L)
    kl_d = -0.5 * (1.0 + logvar_L - jnp.square(mu_L) - jnp.exp(logvar_L))
    return jnp.sum(jnp.maximum(kl_d, free_bits))


def model_loss(logits_HxWxC: jax.Array, x_HxWxC: jax.Array, mu_L: jax.Array, logvar_L: jax.Array,
               log_gamma: jax.Array, config: ModelConfig, use_kl: bool = True) -> LossTerms:
    """The model's loss of one image: L_r + KL (KL only when the model and `use_kl` both say so;
    never for the deterministic AEs, whose config has use_kl False)."""
    recon = reconstruction_loss(logits_HxWxC, x_HxWxC, log_gamma, config)
    kl = kl_divergence(mu_L, logvar_L) if (config.use_kl and use_kl) else jnp.zeros(())
    return LossTerms(recon + kl, recon, kl)


def constant_prediction_loss(x_NxHxWxC: jax.Array, config: ModelConfig) -> float:
    """Per-pixel L_r of the best constant predictor (the dataset mean per channel).

    A collapsed model that predicts the mean image reaches about this value: for BCE it is the
    Bernoulli cross-entropy of x against its channel means (ln 2 = 0.693 for mean 0.5); for the
    Gaussian likelihood (and the AEs, whose check compares squared errors) it is the per-pixel mean
    squared error of that predictor (the data variance).
    """
    x = jnp.asarray(x_NxHxWxC, jnp.float32)
    m = jnp.clip(jnp.mean(x, axis=(0, 1, 2), keepdims=True), 1e-6, 1 - 1e-6)  # (1, 1, 1, C)
    if config.likelihood == "bce":
        return float(-jnp.mean(x * jnp.log(m) + (1 - x) * jnp.log1p(-m)))
    return float(jnp.mean(jnp.square(x - m)))  # gaussian, l2, ssim: compared on the squared error
