"""The convolutional VAE of Bergmann et al. 2018, as used by Dehaene et al. 2020 (docs/method.md, Training).

Images are NHWC float32 in [0, 1]. The decoder returns logits; f(x) = sigmoid(logits).
Use it through `apply`: `VAE(cfg).apply(params, x_BxHxWxC)` or with `method=VAE.encode`.

Convolutions have two implementations with the same parameters (names, shapes, initial values),
so a checkpoint made with one runs with the other:

- "plain": flax's `nn.Conv` / `nn.ConvTranspose` (`lax` convolutions, JAX's own gradients);
- "xla_cpu": the same maths formulated for XLA:CPU, whose convolutions inside loop bodies are
  slow otherwise (`iepjax.xla_cpu_convs`).

"auto" picks "xla_cpu" on CPU and "plain" elsewhere (GPU, TPU). The choice, in order: the
module's `conv` attribute (`VAE(cfg, conv="plain")`, or the `conv=` keyword of `project_fn`);
the process setting (`using_conv` for a block, `set_default_conv` for the process); the
environment variable IEPJAX_CONV (read at import); "auto". It is not part of `ModelConfig`
(a checkpoint does not record it). The process setting is part of `jax.jit`'s cache key, so a
jitted function traced under one implementation is retraced under the other.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from iepjax import xla_cpu_convs
from iepjax.config import ModelConfig

# (features, kernel, stride) of the encoder's convolutions; padding 1 on each side as in the
# PyTorch reference, so stride-2 k4 convs halve the size exactly.
ENCODER_SPEC: tuple[tuple[int, int, int], ...] = (
    (32, 4, 2), (32, 4, 2), (32, 3, 1), (64, 4, 2), (64, 3, 1), (128, 4, 2), (64, 3, 1), (32, 3, 1))
_PAD1 = ((1, 1), (1, 1))

# ------------------------------------------------------------------ which convolutions

CONV_CHOICES: tuple[str, ...] = ("auto", "plain", "xla_cpu")
CONV_ENV = "IEPJAX_CONV"

# The process setting: a `jax.make_user_context`, whose value is part of the key of every
# `jax.jit` cache (tracing, lowering, compilation), so changing it retraces.
_conv_setting = jax.make_user_context(default_value=os.environ.get(CONV_ENV, "auto"))


def _checked(conv: str, where: str = "conv") -> str:
    if conv not in CONV_CHOICES:
        raise ValueError(f"{where}={conv!r} is not valid: choose one of {', '.join(CONV_CHOICES)}")
    return conv


def default_conv() -> str:
    """The process setting: "auto", "plain" or "xla_cpu" (`using_conv`, `set_default_conv`, IEPJAX_CONV)."""
    return _checked(_conv_setting.value, "the convolution setting (IEPJAX_CONV)")


def set_default_conv(conv: str) -> None:
    """Set the convolutions of every `VAE` without its own `conv`, for the whole process."""
    _conv_setting.set_global(_checked(conv))


def using_conv(conv: str | None):
    """Context manager: the convolutions of every `VAE` without its own `conv` inside the block
    (this thread); None keeps the current setting. Jitted functions called inside retrace for it."""
    return _conv_setting(default_conv() if conv is None else _checked(conv))


def _platform() -> str:
    """The platform computations are placed on: `jax.default_device`'s if set, else the default backend's."""
    device = jax.config.jax_default_device
    if device is None:
        return jax.default_backend()
    return getattr(device, "platform", str(device))


def resolve_conv(conv: str | None = None, *, platform: str | None = None) -> str:
    """The implementation a `VAE(conv=conv)` uses: "plain" or "xla_cpu".

    conv: "plain" or "xla_cpu" (returned as is), "auto" ("xla_cpu" on the CPU platform, "plain" on
    any other), or None (the process setting, `default_conv`). platform: the platform "auto"
    decides for (default: where computations are placed, `jax.default_device` or the default
    backend). Resolved when the model is traced. The process setting and `jax.default_device` are
    part of `jax.jit`'s cache key, so a change of either retraces; the platform of the arguments
    is not: to run on a platform other than the default, place it with `jax.default_device` or
    choose explicitly.
    """
    conv = default_conv() if conv is None else _checked(conv)
    if conv != "auto":
        return conv
    return "xla_cpu" if (platform or _platform()) == "cpu" else "plain"


# ------------------------------------------------------------------------------ layers

# He initialisation for LeakyReLU(0.2) (He et al. 2015): variance 2 / ((1 + 0.2^2) fan_in) keeps the
# signal's scale through the 20-odd layers, so at initialisation f(x) depends on x. With the default
# LeCun scale (or PyTorch's, smaller still) it shrinks by ~2x per layer and training sits at the
# mean image for many epochs.
KERNEL_INIT = nn.initializers.variance_scaling(2.0 / (1.0 + 0.2 ** 2), "fan_in", "truncated_normal")


def _transposed_init(strides: tuple[int, int]) -> Callable:
    """He initialisation of a transposed conv: each output of a stride-s layer sees 1/(s_h s_w) of the
    kernel's taps, so the scale is taken over that effective fan-in."""
    return nn.initializers.variance_scaling(2.0 / (1.0 + 0.2 ** 2) * strides[0] * strides[1], "fan_in",
                                            "truncated_normal")


def _conv(impl: str, features: int, kernel: int, stride: int = 1, padding: Any = _PAD1) -> nn.Module:
    """A conv layer "Conv_i" (kernel (k, k, I, O), bias (O,)), He-initialised."""
    layer = xla_cpu_convs.Conv if impl == "xla_cpu" else nn.Conv
    return layer(features, (kernel, kernel), (stride, stride), padding=padding, kernel_init=KERNEL_INIT)


def _upsample_conv(impl: str, h_BxHxWxI: jax.Array, features: int) -> jax.Array:
    """A 3x3 conv layer "Conv_i" applied to h upsampled 2x (nearest): (B, H, W, I) -> (B, 2H, 2W, features)."""
    if impl == "xla_cpu":
        return xla_cpu_convs.UpsampleConv(features, kernel_init=KERNEL_INIT)(h_BxHxWxI)
    return nn.Conv(features, (3, 3), padding=_PAD1, kernel_init=KERNEL_INIT)(_upsample(h_BxHxWxI, 2))


def _conv_transpose(impl: str, features: int, kernel: int, stride: int = 1, padding: Any = "VALID") -> nn.Module:
    """A transposed conv layer "ConvTranspose_i" (kernel (k, k, I, O) not flipped, as `lax.conv_transpose`
    with transpose_kernel=False; bias (O,)), He-initialised over its effective fan-in."""
    layer = xla_cpu_convs.ConvTranspose if impl == "xla_cpu" else nn.ConvTranspose
    return layer(features, (kernel, kernel), (stride, stride), padding=padding,
                 kernel_init=_transposed_init((stride, stride)))


def _act(x: jax.Array) -> jax.Array:
    return nn.leaky_relu(x, negative_slope=0.2)


def _upsample(x_BxHxWxC: jax.Array, factor: int) -> jax.Array:
    """Nearest-neighbour upsampling by an integer factor."""
    x = jnp.repeat(x_BxHxWxC, factor, axis=1)
    return jnp.repeat(x, factor, axis=2)


class Posterior(NamedTuple):
    """Gaussian posterior q(z|x) = N(mu, exp(logvar)); each (B, latent)."""

    mu: jax.Array
    logvar: jax.Array


class Output(NamedTuple):
    """Decoder logits (B, H, W, C) and the posterior they were decoded from."""

    logits: jax.Array
    posterior: Posterior


class Encoder(nn.Module):
    """x (B, H, W, C) in [0, 1] -> q(z|x): eight convs, a (H/16)x(H/16) 'valid' conv to 1x1, dense mu, logvar.

    For a deterministic AE (`ModelConfig.deterministic`) there is no logvar layer: the code is mu,
    returned with logvar 0 (never sampled: the AE's loss has no KL and training draws no z).

    `conv`: the convolutions' implementation, as `VAE.conv`.
    """

    config: ModelConfig
    conv: str | None = None

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> Posterior:
        impl = resolve_conv(self.conv)
        h = x_BxHxWxC
        for features, kernel, stride in ENCODER_SPEC:
            h = _act(_conv(impl, features, kernel, stride)(h))
        h = _conv(impl, self.config.latent, self.config.size // 16, padding="VALID")(h)
        h = h.reshape(h.shape[0], -1)
        mu = nn.Dense(self.config.latent, name="mu")(h)
        if self.config.deterministic:  # an AE (ModelConfig.model_name "ae_l2" / "ae_ssim"): the code is mu, no variance
            return Posterior(mu, jnp.zeros_like(mu))
        logvar = nn.Dense(self.config.latent, name="logvar")(h)
        # Bounded so exp(logvar) can neither overflow nor vanish (a NaN guard; q stays Gaussian).
        return Posterior(mu, jnp.clip(logvar, -15.0, 8.0))


class Decoder(nn.Module):
    """z (B, latent) -> logits (B, H, W, C): mirror of the encoder, upsample+conv or transposed convs.

    `conv`: the convolutions' implementation, as `VAE.conv`.
    """

    config: ModelConfig
    conv: str | None = None

    @nn.compact
    def __call__(self, z_BxL: jax.Array) -> jax.Array:
        cfg = self.config
        impl = resolve_conv(self.conv)
        k = cfg.size // 16
        h = z_BxL[:, None, None, :]

        def conv3(h, f):
            return _act(_conv(impl, f, 3)(h))

        if cfg.decoder == "upsample":  # the public PyTorch port's decoder
            def upconv(h, f):  # conv3x3(upsample_2x(h))
                return _upsample_conv(impl, h, f)

            h = _upsample(h, k)
            h = conv3(conv3(conv3(h, 32), 64), 128)
            h = conv3(_act(upconv(h, 64)), 64)
            h = conv3(_act(upconv(h, 32)), 32)
            h = _act(upconv(h, 32))
            return upconv(h, cfg.channels)
        # Bergmann et al. 2018: transposed convs (torch padding p=1, k=4 <=> flax padding k-1-p=2).
        def up(h, f):
            return _conv_transpose(impl, f, 4, 2, padding=((2, 2), (2, 2)))(h)

        h = _act(_conv_transpose(impl, 32, k)(h))
        h = conv3(conv3(h, 64), 128)
        h = conv3(_act(up(h, 64)), 64)
        h = conv3(_act(up(h, 32)), 32)
        h = _act(up(h, 32))
        return up(h, cfg.channels)


class VAE(nn.Module):
    """The method's VAE; `__call__` decodes the posterior mean, or a sample when `key` is given.

    The same module is the paper's deterministic autoencoders (AE-L2, AE-SSIM) when
    `config.deterministic`: the same encoder and decoder without the logvar head; `key` is then
    ignored (z = mu).

    Shapes: x (B, size, size, channels) in [0, 1] -> Output(logits (B, size, size, channels),
    Posterior(mu, logvar) each (B, latent)). With a Gaussian likelihood the module also owns
    the scalar parameter `log_gamma` (log of the decoder's standard deviation, Dai & Wipf 2019).

    `conv`: the convolutions' implementation, "plain", "xla_cpu" or "auto"; None (the default)
    follows the process setting (module docstring, `resolve_conv`). Either gives the same
    parameters.
    """

    config: ModelConfig
    conv: str | None = None

    def setup(self) -> None:
        impl = resolve_conv(self.conv)
        self.encoder = Encoder(self.config, impl)
        self.decoder = Decoder(self.config, impl)
        if self.config.likelihood == "gaussian":
            self.log_gamma = self.param("log_gamma", nn.initializers.zeros, ())

    def encode(self, x_BxHxWxC: jax.Array) -> Posterior:
        """q(z|x): x (B, H, W, C) -> Posterior (B, latent)."""
        return self.encoder(x_BxHxWxC)

    def decode(self, z_BxL: jax.Array) -> jax.Array:
        """z (B, latent) -> logits (B, H, W, C); f = sigmoid(logits)."""
        return self.decoder(z_BxL)

    def gamma_log(self) -> jax.Array:
        """log gamma of the Gaussian decoder (0 for a Bernoulli decoder)."""
        if self.config.likelihood == "gaussian":
            return self.log_gamma
        return jnp.zeros(())

    def __call__(self, x_BxHxWxC: jax.Array, key: jax.Array | None = None) -> Output:
        post = self.encode(x_BxHxWxC)
        z = post.mu
        if key is not None and not self.config.deterministic:  # reparameterisation trick (training only)
            eps = jax.random.normal(key, post.mu.shape, post.mu.dtype)
            z = post.mu + jnp.exp(0.5 * post.logvar) * eps
        return Output(self.decode(z), post)


def init_params(config: ModelConfig, *, key: jax.Array) -> dict:
    """Initial parameters of `VAE(config)` for inputs (1, size, size, channels).

    The values are flax's `VAE(config).init(key, x)`, on CPU bit for bit (tested), whichever the
    convolutions' implementation. Called with a concrete key, one compiled program computes them
    (`_compiled_init`), much faster to start than the initialisers run op by op. Under a
    transformation (a traced key: jit, vmap over keys, eval_shape) it is flax's init.
    """
    if isinstance(key, jax.core.Tracer):
        return _init(config, key)
    return _compiled_init(config, key.shape, key.dtype, resolve_conv())(key)


def _init(config: ModelConfig, key: jax.Array, conv: str | None = None) -> dict:
    x = jnp.zeros((1, config.size, config.size, config.channels), jnp.float32)
    return VAE(config, conv=conv).init(key, x)


@functools.cache
def _compiled_init(config: ModelConfig, key_shape: tuple[int, ...], key_dtype, conv: str):
    # XLA:CPU's default optimisation level spends long compiling the initialisers' random-bit
    # generators; level 1 is several times faster and gives the same bits and values as the eager
    # init (level 0 does not: its float rounding differs). Other backends keep their defaults.
    lowered = jax.jit(functools.partial(_init, config, conv=conv)).lower(jax.ShapeDtypeStruct(key_shape, key_dtype))
    return lowered.compile({"xla_backend_optimization_level": 1} if jax.default_backend() == "cpu" else None)
