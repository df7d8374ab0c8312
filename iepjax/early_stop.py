"""Early stopping of the projection at the loss of the most likely normal image (docs/method.md, Projection).

A public port of the method stops once L_r falls below the smallest training loss. Here the
stopping loss is the smallest L_r of the run's held-out normal images: a projected image stops
once it is as likely under the model as the most likely normal image (`ProjectionConfig.stop_loss`).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from iepjax.config import ProjectionConfig
from iepjax.data.preprocess import Preprocess, model_inputs
from iepjax.energy import energy


@functools.partial(jax.jit, static_argnames="config")
def _model_losses(params: dict, x_BxHxWxC: jax.Array, config: ProjectionConfig) -> jax.Array:
    """L_r(x) of each image of a batch (B,): the energy at x0 = x, where the prior is 0 (paper eq. 3)."""
    return jax.vmap(lambda x: energy(params, x, x, config)[0])(x_BxHxWxC)


def with_early_stop(params: dict, config: ProjectionConfig, normal_images, prep: Preprocess | None = None, *,
                    batch_size: int = 64) -> ProjectionConfig:
    """`config` with stop_loss = the smallest L_r of held-out normal images.

    normal_images: uint8 images, preprocessed with `prep` (tiled / resized as the test images are;
    None: already at the model size). Raises FloatingPointError when a loss is not finite (a
    diverged model), which no stopping rule can use.
    """
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
