"""The model's own training loss, for one image (method.md, Training).

L(x) = L_r(x, f(x)) + KL(q(z|x) || N(0, I)), all terms summed over pixels and channels.
Write the maths for one image; `jax.vmap` it over a batch.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

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


def reconstruction_loss(logits_HxWxC: jax.Array, x_HxWxC: jax.Array, log_gamma: jax.Array,
                        config: ModelConfig) -> jax.Array:
    """L_r for one image under the configured likelihood ("bce" or "gaussian")."""
    if config.likelihood == "bce":
        return bce_sum(logits_HxWxC, x_HxWxC)
    if config.likelihood == "gaussian":
        return gaussian_nll_sum(logits_HxWxC, x_HxWxC, log_gamma)
    raise ValueError(f"unknown likelihood {config.likelihood!r}: choose bce or gaussian")


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
    """The model's loss of one image: L_r + KL (KL only when the model and `use_kl` both say so)."""
    recon = reconstruction_loss(logits_HxWxC, x_HxWxC, log_gamma, config)
    kl = kl_divergence(mu_L, logvar_L) if (config.use_kl and use_kl) else jnp.zeros(())
    return LossTerms(recon + kl, recon, kl)


def constant_prediction_loss(x_NxHxWxC: jax.Array, config: ModelConfig) -> float:
    """Per-pixel L_r of the best constant predictor (the dataset mean per channel).

    A collapsed model that predicts the mean image reaches about this value: for BCE it is the
    Bernoulli cross-entropy of x against its channel means (ln 2 = 0.693 for mean 0.5); for the
    Gaussian likelihood it is the per-pixel mean squared error of that predictor (the data variance).
    """
    x = jnp.asarray(x_NxHxWxC, jnp.float32)
    m = jnp.clip(jnp.mean(x, axis=(0, 1, 2), keepdims=True), 1e-6, 1 - 1e-6)  # (1, 1, 1, C)
    if config.likelihood == "bce":
        return float(-jnp.mean(x * jnp.log(m) + (1 - x) * jnp.log1p(-m)))
    return float(jnp.mean(jnp.square(x - m)))
