"""The iterative energy-based projection onto the normal-data manifold (docs/method.md, Projection).

For t = 0 .. T-1 (docs/method.md's update (2); paper eq. 4):
    x_{t+1} = clip(x_t - alpha * grad_x E(x_t) * (x_t - f(x_t))^2, 0, 1)
with E the energy of `iepjax.energy`. The maths is written for one image; `project_fn` vmaps it
over the batch and runs the T steps as one `lax.scan` inside one jitted XLA program.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from iepjax.anomaly_maps import difference_map
from iepjax.config import ProjectionConfig, join_traced, split_traced
from iepjax.energy import energy
from iepjax.model import resolve_conv, using_conv


class ProjectionResult(NamedTuple):
    """Output of `project_fn` for a batch of B images of shape (H, W, C).

    x_T: projected images (B, H, W, C) in [0, 1].
    maps: anomaly maps mean_c |x_T - x0| (smoothed per the config) (B, H, W).
    energies: E(x_t) for t = 0..T-1, per image (B, T).
    """

    x_T: jax.Array
    maps: jax.Array
    energies: jax.Array


def descent_direction(params: dict, x_HxWxC: jax.Array, x0_HxWxC: jax.Array,
                      config: ProjectionConfig) -> tuple[jax.Array, jax.Array]:
    """(E(x), d) for one image: d = grad_x E(x) * (x - f(x))^2 (paper eq. 4), or the plain gradient
    without `config.weighting`; d has the image's shape (H, W, C).

    The gradient of E flows through the network (f depends on x); the weighting uses the same
    forward pass and is not differentiated. Where a pixel is still at x0, E is not differentiable
    (the kink of lam |x - x0|); there grad_x E is its subgradient of least magnitude,
    g_r - clip(g_r, -lam, lam) with g_r = grad_x L_r: the pixel stays at x0 while |g_r| <= lam,
    and leaves it in the direction of g_r, slowed by lam, once the model's loss pulls harder.
    (PyTorch's abs takes 0 at the kink: every pixel moves at the first step, and those with
    |g_r| < lam are pushed back and forth across x0 afterwards, raising E.) With lam = 0 the two
    are the same.
    """
    (e, aux), g = jax.value_and_grad(energy, argnums=1, has_aux=True)(params, x_HxWxC, x0_HxWxC, config)
    # At x = x0 the prior contributes 0 to g (energy.py), so g is grad L_r there: soft-threshold it.
    g = jnp.where(x_HxWxC == x0_HxWxC, g - jnp.clip(g, -config.lam, config.lam), g)
    if config.weighting:
        g = g * jnp.square(x_HxWxC - aux.recon_image)
    return e, g


def projection_step(params: dict, x_HxWxC: jax.Array, x0_HxWxC: jax.Array,
                    config: ProjectionConfig) -> tuple[jax.Array, jax.Array]:
    """One update of one image (paper eq. 4): returns (x_{t+1} (H, W, C), E(x_t) scalar).

    x_{t+1} = clip(x_t - alpha * grad_x E(x_t) * (x_t - f(x_t))^2, 0, 1), without the
    backtracking safeguard of `project_image`.
    """
    e, d = descent_direction(params, x_HxWxC, x0_HxWxC, config)
    return jnp.clip(x_HxWxC - config.alpha * d, 0.0, 1.0), e


class _Carry(NamedTuple):
    x: jax.Array       # the point evaluated at this step
    x_acc: jax.Array   # the last accepted point (whose energy did not rise) and its
    d_acc: jax.Array   # descent direction and
    e_acc: jax.Array   # energy
    alpha: jax.Array   # this image's step size (halved at each rejected step)
    stopped: jax.Array  # early stopping (config.stop_loss): this image no longer moves


def project_image(params: dict, x0_HxWxC: jax.Array, config: ProjectionConfig) -> ProjectionResult:
    """Project one image (H, W, C): `config.steps` updates (paper eq. 4) in one `lax.scan`.

    Each step evaluates E and its descent direction at x_t once. With `config.backtrack`, a step
    whose energy rose above the last accepted one is undone: the update is retaken from the last
    accepted point with half the step size (no extra network evaluation: its direction is kept
    in the scan's carry). With `config.stop_loss`, the image stops moving from the first step at
    which its L_r(x_t) <= stop_loss (early stopping; the scan still runs T steps, so the program
    stays one per shape). Returns ProjectionResult with unbatched fields: x_T (H, W, C),
    map (H, W), energies (T,) (E at each evaluated point, rejected ones included).
    """
    init, body = scan_parts(params, x0_HxWxC, config)
    last, energies = jax.lax.scan(lambda c, _: body(c), init, None, length=config.steps)
    x_T = last.x
    return ProjectionResult(x_T, difference_map(x_T, x0_HxWxC, config.smoothing_sigma), energies)


def scan_parts(params: dict, x0_HxWxC: jax.Array, config: ProjectionConfig):
    """(initial carry, body) of `project_image`'s scan for one image: body(carry) -> (carry, E(x_t)),
    carry.x = x_{t+1}. Shared with `localization.trajectory`, which also records the x_t."""
    check_resolved(config)
    def step(c: _Carry):
        if not config.backtrack:  # the paper's loop: alpha never changes
            x_next, e = projection_step(params, c.x, x0_HxWxC, config)
            return c._replace(x=x_next), e
        e, d = descent_direction(params, c.x, x0_HxWxC, config)
        rejected = e > c.e_acc
        alpha = jnp.where(rejected, 0.5 * c.alpha, c.alpha)
        x_acc = jnp.where(rejected, c.x_acc, c.x)
        d_acc = jnp.where(rejected, c.d_acc, d)
        e_acc = jnp.where(rejected, c.e_acc, e)
        return _Carry(jnp.clip(x_acc - alpha * d_acc, 0.0, 1.0), x_acc, d_acc, e_acc, alpha, c.stopped), e

    def body(c: _Carry):
        new, e = step(c)
        if config.stop_loss is None:
            return new, e
        # L_r(x_t) = E(x_t) minus the prior, at the point this step evaluated
        stopped = c.stopped | (e - config.lam * jnp.sum(jnp.abs(c.x - x0_HxWxC)) <= config.stop_loss)
        new = jax.tree.map(lambda old, nxt: jnp.where(stopped, old, nxt), c, new)
        return new._replace(stopped=stopped), e

    init = _Carry(x0_HxWxC, x0_HxWxC, jnp.zeros_like(x0_HxWxC), jnp.array(jnp.inf, jnp.float32),
                  jnp.asarray(config.alpha, jnp.float32), jnp.array(False))
    return init, body


def project_batch(params: dict, x0_BxHxWxC: jax.Array, config: ProjectionConfig) -> ProjectionResult:
    """`project_image` vmapped over a batch (B, H, W, C), not jitted: the body of `project_fn`'s
    program and of the sharded one (`sharding.project_sharded`)."""
    return jax.vmap(project_image, in_axes=(None, 0, None))(params, x0_BxHxWxC, config)


@functools.partial(jax.jit, static_argnames="config")
def _project_batch(params: dict, x0_BxHxWxC: jax.Array, config: ProjectionConfig, values: dict) -> ProjectionResult:
    """`config`: a compile key of `split_traced`, `values` its traced alpha, lam and stop_loss."""
    return project_batch(params, x0_BxHxWxC, join_traced(config, values))


def check_resolved(config: ProjectionConfig) -> None:
    """ValueError when `config` still gives alpha or lam in the model's units (`step` / `hold`)."""
    if not config.resolved:
        raise ValueError(f"ProjectionConfig gives step={config.step} / hold={config.hold} (alpha and lam in the "
                         "model's own units): resolve them on normal images first (iepjax.loss_scale.resolve), "
                         "or set them to None and give alpha and lam")


def check_images(x_BxHxWxC, config: ProjectionConfig) -> None:
    """Raise a ValueError/TypeError that says what to do when a batch does not fit the model.

    Checks the shape (B, size, size, channels), a float dtype and, for concrete arrays, that the
    values lie in [0, 1] (within RANGE_SLACK; NaN and inf are let through). Traced arrays (inside
    jit, vmap or grad) get the shape and dtype checks only.
    """
    shape = getattr(x_BxHxWxC, "shape", None)
    m = config.model
    want = f"(B, {m.size}, {m.size}, {m.channels})"
    if shape is None or len(shape) != 4:
        raise ValueError(f"expected a batch of images shaped {want} (NHWC), got shape {shape}; "
                         "add a batch axis with x[None] for a single image")
    if shape[-1] != m.channels:
        raise ValueError(f"the images have {shape[-1]} channel(s) but the model was trained on "
                         f"{m.channels}; convert them ({'to gray' if m.channels == 1 else 'to RGB'}) "
                         f"or use a model trained with channels={shape[-1]}")
    if shape[1] != m.size or shape[2] != m.size:
        raise ValueError(f"the images are {shape[1]}x{shape[2]} but the model takes {m.size}x{m.size}; "
                         "resize or tile them first (iepjax.data has helpers)")
    dtype = np.dtype(getattr(x_BxHxWxC, "dtype", np.float32))
    if not np.issubdtype(dtype, np.floating):
        raise TypeError(f"expected float images in [0, 1], got dtype {dtype}; for uint8 images pass x / 255.0")
    lo_hi = _value_range(x_BxHxWxC)
    if lo_hi is not None and (lo_hi[0] < -RANGE_SLACK or lo_hi[1] > 1 + RANGE_SLACK):
        hint = ("divide by 255 (uint8 pixel values)" if lo_hi[1] > 1 + RANGE_SLACK and lo_hi[1] <= 255 + RANGE_SLACK
                and lo_hi[0] >= -RANGE_SLACK else "rescale or clip them to [0, 1] (np.clip(x, 0, 1))")
        raise ValueError(f"the images have values in [{lo_hi[0]:.6g}, {lo_hi[1]:.6g}], outside [0, 1] that the model "
                         f"was trained on: {hint}")


# Float round-off of a resize or colour conversion may leave values a hair outside [0, 1]; the
# projection clips x_t to [0, 1] at every step anyway. Anything beyond this is a scaling mistake
# (x * 255 gave maps up to 160 instead of at most 1).
RANGE_SLACK = 1e-3


def _value_range(x) -> tuple[float, float] | None:
    """(min, max) of the finite values of a concrete array, None when it cannot or need not be checked.

    Only concrete values are checked: numpy arrays and jax.Arrays outside tracing whose values this
    process holds (inside jit / vmap / grad the values are abstract tracers; an array sharded over
    several processes is checked by each process on its own rows, here skipped). NaN and inf pass:
    a non-finite image gives a non-finite map of its own and leaves its batch-mates alone.
    """
    if isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, jax.Array):
        if not x.is_fully_addressable or x.size == 0:
            return None
        finite = jnp.isfinite(x)
        if not bool(jnp.any(finite)):
            return None
        lo = jnp.min(jnp.where(finite, x, jnp.inf))
        hi = jnp.max(jnp.where(finite, x, -jnp.inf))
        return float(lo), float(hi)
    a = np.asarray(x)
    finite = a[np.isfinite(a)] if a.size else a
    if finite.size == 0:
        return None
    return float(finite.min()), float(finite.max())


def project_fn(params: dict, x0_BxHxWxC: jax.Array, config: ProjectionConfig, *,
               conv: str | None = None) -> ProjectionResult:
    """Project a batch of images onto the normal-data manifold and return their anomaly maps.

    One jitted XLA program per (shape, config, convolution implementation): `vmap` over the batch
    of a `lax.scan` over `config.steps` gradient updates (paper eq. 4) of the energy
    E(x) = L_r(x) + lam ||x - x0||_1 (docs/method.md, Projection). alpha, lam and stop_loss enter
    the program as traced scalars (`config.split_traced`), so configs that differ only in them
    share one program.

    Args:
      params: parameters of `VAE(config.model)` (from `init_params`, training or a checkpoint),
        whichever convolution implementation made them.
      x0_BxHxWxC: images (B, size, size, channels), float in [0, 1] (uint8 images: x / 255.0).
      config: a `ProjectionConfig` (static: hashable, part of the compile key, except its values of
        alpha, lam and stop_loss).
      conv: the model's convolutions, "plain", "xla_cpu" or "auto" (`iepjax.model.resolve_conv`);
        None follows the process setting. Resolved here, outside the jitted program, and part
        of its compile key.
    Returns:
      ProjectionResult(x_T (B, H, W, C), maps (B, H, W), energies (B, T)).
    Raises:
      ValueError: a config with `step` / `hold` left to resolve (`loss_scale.resolve`; raised while
        tracing, by `scan_parts`); images of the wrong shape, or (numpy or concrete jax arrays) with values outside
        [0, 1] beyond float round-off: the message gives the range found and says to divide by 255
        or clip. Such images are not clipped silently: a batch scaled by 255 would give maps up to
        ~160 that look like results. NaN / inf values pass (their images get non-finite maps).
        Inside jit or vmap only the shape and dtype are checked.
      TypeError: integer images (divide uint8 images by 255.0 first).
    """
    check_images(x0_BxHxWxC, config)
    with using_conv(resolve_conv(conv)):
        return _project_batch(params, jnp.asarray(x0_BxHxWxC, jnp.float32), *split_traced(config))
