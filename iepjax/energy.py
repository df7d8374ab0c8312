"""The energy minimised by the projection, for one image (docs/method.md, Projection, (1); paper eq. 3).

E(x) = L_r(x) + lam * ||x - x0||_1, where L_r is the trained model's own loss of x evaluated with
the posterior mean (no sampling), so E is deterministic and its gradient flows through the
encoder and the decoder. The same code serves every model (VAE, AE-L2, AE-SSIM): only L_r, the
model's training loss (`losses.model_loss`), differs. With `ProjectionConfig.gradient`
"detached" the network's outputs are held constant while differentiating (the ports' ablation).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from iepjax.config import ProjectionConfig
from iepjax.losses import model_loss
from iepjax.model import VAE


class EnergyAux(NamedTuple):
    """By-products of one energy evaluation: f(x) (H, W, C) and the loss terms (scalars)."""

    recon_image: jax.Array
    recon: jax.Array
    kl: jax.Array
    prior: jax.Array


def reconstruct(params: dict, x_HxWxC: jax.Array, config: ProjectionConfig) -> jax.Array:
    """f(x) = sigmoid(decode(mu(x))) for one image (H, W, C) -> (H, W, C)."""
    out = VAE(config.model).apply(params, x_HxWxC[None])
    return jax.nn.sigmoid(out.logits[0])


def energy(params: dict, x_HxWxC: jax.Array, x0_HxWxC: jax.Array,
           config: ProjectionConfig) -> tuple[jax.Array, EnergyAux]:
    """E(x) = L_r(x) + lam ||x - x0||_1 for one image (H, W, C); returns (E, aux).

    L_r is `losses.model_loss` (the training loss: BCE or Gaussian NLL plus KL when
    `config.use_kl` for the VAE, summed squared error or summed 1 - SSIM for the AEs) at the
    posterior mean. With `config.gradient` "detached", f(x) and the posterior are constants for
    differentiation (`jax.lax.stop_gradient`): grad_x L_r is then dL_r(x, f)/dx at fixed f, and
    the KL term (a function of the encoder's output only) contributes nothing. The value of E is
    the same either way. Differentiate with `jax.grad(energy, argnums=1, has_aux=True)`.
    """
    vae = VAE(config.model)
    out = vae.apply(params, x_HxWxC[None])
    if config.gradient == "detached":  # the public ports: no gradient through the network
        out = jax.lax.stop_gradient(out)
    log_gamma = vae.apply(params, method=VAE.gamma_log)
    terms = model_loss(out.logits[0], x_HxWxC, out.posterior.mu[0], out.posterior.logvar[0],
                       log_gamma, config.model, use_kl=config.use_kl)
    # |d| with the subgradient sign(d), 0 at d = 0 (as PyTorch's abs): jax.grad(jnp.abs)(0.) is 1,
    # which on the first step (x = x0) would push every pixel down by alpha * lam * (x - f)^2.
    # `projection.descent_direction` replaces the 0 at d = 0 by the least-magnitude subgradient.
    d = x_HxWxC - x0_HxWxC
    prior = config.lam * jnp.sum(d * jax.lax.stop_gradient(jnp.sign(d)))
    aux = EnergyAux(jax.nn.sigmoid(out.logits[0]), terms.recon, terms.kl, prior)
    return terms.total + prior, aux
