"""One training step of the VAE: the batch loss and one Adam update (docs/method.md, Training).

Loss of one image: L_r(x, f(z)) + KL(q(z|x) || N(0, I)) with z ~ q(z|x) (reparameterisation),
averaged over the batch; Adam(lr, b1, b2). Textures get random flips and 90-degree rotations.
The step is a pure function of (state, batch, config): `iepjax.sharding` splits it over a
device mesh, `iepjax.training` runs it in a loop with checkpoints.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from iepjax.config import ModelConfig, TrainConfig
from iepjax.losses import LossTerms, kl_free_bits, model_loss
from iepjax.model import VAE, init_params


class TrainState(NamedTuple):
    """Everything a resumed run needs: step, parameters, Adam state."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState


def optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Adam with the paper's settings (lr 2e-4, betas (0.5, 0.999) by default)."""
    return optax.adam(config.learning_rate, b1=config.b1, b2=config.b2)


def init_state(config: TrainConfig, *, key: jax.Array) -> TrainState:
    """Fresh parameters and optimiser state."""
    params = init_params(config.model, key=key)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer(config).init(params))


def augment(x_HxWxC: jax.Array, *, key: jax.Array) -> jax.Array:
    """Random horizontal flip and rotation by a multiple of 90 degrees of one square image."""
    k_flip, k_rot = jax.random.split(key)
    x = jnp.where(jax.random.bernoulli(k_flip), x_HxWxC[:, ::-1], x_HxWxC)
    r = jax.random.randint(k_rot, (), 0, 4)
    return jax.lax.switch(r, [lambda a, k=k: jnp.rot90(a, k, axes=(0, 1)) for k in range(4)], x)


def image_loss(params: dict, x_HxWxC: jax.Array, config: ModelConfig, *, key: jax.Array | None) -> LossTerms:
    """Training loss of one image (H, W, C): L_r + KL with z sampled when `key` is given."""
    vae = VAE(config)
    out = vae.apply(params, x_HxWxC[None], key)
    log_gamma = vae.apply(params, method=VAE.gamma_log)
    return model_loss(out.logits[0], x_HxWxC, out.posterior.mu[0], out.posterior.logvar[0], log_gamma, config)


GAMMA_MIN = 1e-3  # floor of the Gaussian decoder's std
GAMMA_EMA = 0.98  # decay of the running estimate of gamma^2 kept in the parameters


class BatchAux(NamedTuple):
    """Batch means of the loss terms, and the batch's per-pixel mean squared error of f(z)."""

    terms: LossTerms
    mse: jax.Array


def batch_loss(params: dict, x_BxHxWxC: jax.Array, config: ModelConfig, *, key: jax.Array,
               free_bits: float = 0.0, kl_weight: jax.Array | None = None) -> tuple[jax.Array, BatchAux]:
    """Mean over the batch of the per-image loss, z sampled with one key per image.

    L_r + kl_weight * KL, the KL with a floor of `free_bits` nats per latent dimension
    (`losses.kl_free_bits`); `free_bits` 0 and `kl_weight` None are the model's own loss.
    Gaussian likelihood: gamma is the calibrated decoder std (Dai & Wipf 2019; Rybkin et al. 2021,
    "sigma-VAE"): gamma^2 = the batch's mean squared error, its maximum-likelihood value, so the
    balance between L_r and KL is right from the first step.
    """
    keys = jax.random.split(key, x_BxHxWxC.shape[0])
    # a VAE samples z; without KL (config.use_kl=False) the model is a deterministic AE on the mean.
    # The network runs on the whole batch (not vmapped per image): the kernel gradients of a vmapped
    # conv are grouped convolutions, which XLA's SPMD partitioner gets wrong when the batch is
    # sharded (Shardy: wrong values, GSPMD: a crash). Same values: eps_i ~ N(0, I) from key i.
    vae = VAE(config)
    post = vae.apply(params, x_BxHxWxC, method=VAE.encode)
    mu, logvar = post.mu, post.logvar
    z = mu
    if config.use_kl:
        eps = jax.vmap(lambda k: jax.random.normal(k, mu.shape[1:], mu.dtype))(keys)
        z = mu + jnp.exp(0.5 * logvar) * eps
    logits = vae.apply(params, z, method=VAE.decode)
    mse = jnp.mean(jnp.square(x_BxHxWxC - jax.nn.sigmoid(logits)))
    log_gamma = 0.5 * jnp.log(jnp.maximum(jax.lax.stop_gradient(mse), GAMMA_MIN ** 2))
    terms = jax.vmap(model_loss, in_axes=(0, 0, 0, 0, None, None))(logits, x_BxHxWxC, mu, logvar, log_gamma, config)
    terms = jax.tree.map(jnp.mean, terms)
    if config.use_kl and (free_bits > 0 or kl_weight is not None):  # the collapse remedies (TrainConfig)
        kl = jnp.mean(jax.vmap(kl_free_bits, in_axes=(0, 0, None))(mu, logvar, free_bits))
        total = terms.recon + (kl if kl_weight is None else kl_weight * kl)
        return total, BatchAux(terms, mse)  # the plain KL is what the log reports
    return terms.total, BatchAux(terms, mse)


@functools.partial(jax.jit, static_argnames="config", donate_argnums=0)
def train_step(state: TrainState, batch_BxHxWxC: jax.Array, config: TrainConfig) -> tuple[TrainState, LossTerms]:
    """One Adam step on a uint8 batch (B, H, W, C); keys derive from (seed, step).

    With the Gaussian likelihood the parameter log_gamma is not trained by Adam (its gradient is
    zero) but set to a running average of the batches' optimal gamma^2, for use at test time.
    """
    key = jax.random.fold_in(jax.random.key(config.seed), state.step)
    k_aug, k_z = jax.random.split(key)
    x = batch_BxHxWxC.astype(jnp.float32) / 255.0
    if config.augment:
        x = jax.vmap(lambda a, k: augment(a, key=k))(x, jax.random.split(k_aug, x.shape[0]))
    kl_weight = None
    if config.kl_warmup > 0:
        kl_weight = jnp.minimum(1.0, state.step.astype(jnp.float32) / config.kl_warmup)
    (_, aux), grads = jax.value_and_grad(batch_loss, has_aux=True)(state.params, x, config.model, key=k_z,
                                                                   free_bits=config.free_bits, kl_weight=kl_weight)
    updates, opt_state = optimizer(config).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if config.model.likelihood == "gaussian":
        old = jnp.exp(2.0 * state.params["params"]["log_gamma"])
        var = jnp.where(state.step == 0, aux.mse, GAMMA_EMA * old + (1 - GAMMA_EMA) * aux.mse)
        inner = dict(params["params"], log_gamma=0.5 * jnp.log(jnp.maximum(var, GAMMA_MIN ** 2)))
        params = dict(params, params=inner)
    return TrainState(state.step + 1, params, opt_state), aux.terms


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of the training images used at `step` (deterministic in (seed, step), so resumes repeat it)."""
    return np.random.default_rng([seed, step]).choice(n, size=batch_size, replace=n < batch_size)
