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

from iepjax.config import ProjectionConfig, split_traced
from iepjax.data.preprocess import Preprocess, model_inputs
from iepjax.energy import energy
from iepjax.sharding import fixed_batches


@functools.partial(jax.jit, static_argnames="config")
def _model_losses(params: dict, x_BxHxWxC: jax.Array, config: ProjectionConfig) -> jax.Array:
    """L_r(x) of each image of a batch (B,): the energy at x0 = x, where the prior is 0 (paper eq. 3)."""
    return jax.vmap(lambda x: energy(params, x, x, config)[0])(x_BxHxWxC)


def model_losses(params: dict, config: ProjectionConfig, normal_images, prep: Preprocess | None = None, *,
                 batch_size: int = 64) -> tuple[np.ndarray, list | None]:
    """L_r(x) (the energy at x0 = x, paper eq. 3) of each model input of uint8 `images` (M,), and the
    images' layouts (`preprocess.model_inputs`; None without `prep`: the images are the inputs).

    The same batches every time (`sharding.fixed_batches`: equal sizes, one compiled program), so the
    same images give bit-identical losses: `frozen_at_start` recomputes exactly the values
    `with_early_stop` took its minimum of.
    """
    if prep is not None:
        x, layouts = model_inputs(normal_images, prep)
    else:
        x, layouts = np.asarray(normal_images), None
    # L_r at x0 = x does not read alpha, lam (the prior is 0) or stop_loss: one program for every value
    cfg, _ = split_traced(dataclasses.replace(config, stop_loss=None))
    losses = [np.asarray(_model_losses(params, jnp.asarray(xb, jnp.float32) / 255.0, cfg))[:real]
              for xb, real in fixed_batches(np.asarray(x), batch_size)]
    return np.concatenate(losses), layouts


def with_early_stop(params: dict, config: ProjectionConfig, normal_images, prep: Preprocess | None = None, *,
                    batch_size: int = 64) -> ProjectionConfig:
    """`config` with stop_loss = the smallest L_r of held-out normal images.

    normal_images: uint8 images, preprocessed with `prep` (tiled / resized as the test images are;
    None: already at the model size). Raises FloatingPointError when a loss is not finite (a
    diverged model), which no stopping rule can use; ValueError when there is no image.
    """
    if len(normal_images) == 0:
        raise ValueError("early stopping needs held-out normal images (its bar is the smallest of their losses): "
                         "this run has none; pass --no-early-stop, or retrain with --holdout > 0")
    losses, _ = model_losses(params, config, normal_images, prep, batch_size=batch_size)
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError(
            f"the model's loss is not finite on {int(np.sum(~np.isfinite(losses)))} of {len(losses)} held-out normal "
            "images: the trained model is unusable (it diverged or collapsed); train it again (another --lr or --seed)")
    return dataclasses.replace(config, stop_loss=float(np.min(losses)))


def frozen_at_start(params: dict, config: ProjectionConfig, normal_images, prep: Preprocess | None = None, *,
                    batch_size: int = 64) -> np.ndarray:
    """Which images (N,) bool early stopping freezes at step 0: every model input of the image starts
    at or below `config.stop_loss`, so the projection never moves it and its grad map is 0.

    With the bar of `with_early_stop` taken on these same images, that is at least the image
    whose loss set the bar (for tiled textures only when all of an image's tiles are at the bar).
    All False when `config.stop_loss` is None.
    """
    n = len(normal_images)
    if config.stop_loss is None or n == 0:
        return np.zeros(n, bool)
    losses, layouts = model_losses(params, config, normal_images, prep, batch_size=batch_size)
    at_bar = losses <= config.stop_loss
    if layouts is None:
        return at_bar
    return np.array([bool(np.all(at_bar[lay.start:lay.start + len(lay.positions)])) for lay in layouts])
