"""The convolutional VAE of Bergmann et al. 2018, as used by Dehaene et al. 2020 (method.md, Training).

Images are NHWC float32 in [0, 1]. The decoder returns logits; f(x) = sigmoid(logits).
Use it through `apply`: `VAE(cfg).apply(params, x_BxHxWxC)` or with `method=VAE.encode`.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from iepjax.config import ModelConfig

# (features, kernel, stride) of the encoder's convolutions; padding 1 on each side as in the
# PyTorch reference, so stride-2 k4 convs halve the size exactly.
ENCODER_SPEC: tuple[tuple[int, int, int], ...] = (
    (32, 4, 2), (32, 4, 2), (32, 3, 1), (64, 4, 2), (64, 3, 1), (128, 4, 2), (64, 3, 1), (32, 3, 1))
_PAD1 = ((1, 1), (1, 1))


# ---------------------------------------------------------------------------------------------
# Convolutions whose gradient stays fast inside loop bodies on XLA:CPU (benchmarks/README.md).
#
# JAX's transpose rule writes the input-gradient of a convolution as a convolution with a
# spatially reversed kernel and *swapped* kernel feature dimensions (HLO dim_labels `01oi`).
# In the entry computation XLA:CPU canonicalises such a convolution (transposes the kernel to
# `01io`) and runs it with a fast library kernel; inside a `while` body (lax.scan/fori_loop) it
# does not, and the convolution is emitted as a naive loop nest, 5-20x slower (JAX #12868).
# `conv` below is the same maths with a custom VJP whose input-gradient is a convolution in the
# canonical NHWC/HWIO layout on an explicitly flipped and transposed kernel, so every
# convolution of the projection's loop body is canonical. Forward values, parameter shapes and
# names are unchanged; the kernel gradient (training) is JAX's own.
# ---------------------------------------------------------------------------------------------

_DN = ("NHWC", "HWIO", "NHWC")
Pads = tuple[tuple[int, int], ...]


def _conv_raw(x, w, strides, padding, lhs_dilation):
    return lax.conv_general_dilated(x, w, strides, padding, lhs_dilation=lhs_dilation,
                                    dimension_numbers=_DN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(x_BxHxWxI: jax.Array, w_KxKxIxO: jax.Array, strides: tuple[int, int], padding: Pads,
         lhs_dilation: tuple[int, int]) -> jax.Array:
    """`lax.conv_general_dilated` in NHWC/HWIO with explicit padding and input dilation.

    Same values as the lax call; its input-gradient is a canonical NHWC/HWIO convolution (see
    the note above), which XLA:CPU runs fast inside loop bodies too.
    """
    return _conv_raw(x_BxHxWxI, w_KxKxIxO, strides, padding, lhs_dilation)


def _conv_fwd(x, w, strides, padding, lhs_dilation):
    return _conv_raw(x, w, strides, padding, lhs_dilation), (x, w)


def conv_input_grad(g_BxHoxWoxO: jax.Array, w_KxKxIxO: jax.Array, in_hw: Sequence[int],
                    strides, padding, lhs_dilation) -> jax.Array:
    """d conv(x, w) / dx applied to the cotangent g, as one canonical NHWC/HWIO convolution."""
    k = w_KxKxIxO.shape[:2]
    out_hw = g_BxHoxWoxO.shape[1:3]
    pads = []
    for n, kk, s, d, (lo, _), m in zip(in_hw, k, strides, lhs_dilation, padding, out_hw):
        before = kk - 1 - lo
        after = ((n - 1) * d + 1) + kk - 1 - ((m - 1) * s + 1) - before
        pads.append((before, after))
    w_t = jnp.swapaxes(jnp.flip(w_KxKxIxO, (0, 1)), 2, 3)  # (K, K, O, I), canonical HWIO
    return lax.conv_general_dilated(g_BxHoxWoxO, w_t, tuple(lhs_dilation), tuple(pads),
                                    lhs_dilation=tuple(strides), dimension_numbers=_DN)


def _conv_bwd(strides, padding, lhs_dilation, res, g):
    x, w = res
    dx = conv_input_grad(g, w, x.shape[1:3], strides, padding, lhs_dilation)
    _, vjp_w = jax.vjp(lambda w_: _conv_raw(x, w_, strides, padding, lhs_dilation), w)
    return dx, vjp_w(g)[0]


conv.defvjp(_conv_fwd, _conv_bwd)


def _explicit_pads(padding: Any) -> Pads:
    if isinstance(padding, str):
        if padding.upper() != "VALID":
            raise ValueError(f"padding {padding!r}: use explicit pairs or 'VALID'")
        return ((0, 0), (0, 0))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def flax_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                              dimension_numbers=None, feature_group_count=1, precision=None, **kw):
    """Drop-in for `lax.conv_general_dilated` as `nn.Conv(conv_general_dilated=...)` calls it (2-D NHWC)."""
    if lhs.ndim != 4 or feature_group_count != 1 or any(d != 1 for d in (rhs_dilation or (1, 1))):
        raise NotImplementedError("conv: 2-D NHWC, no groups, no kernel dilation")
    return conv(lhs, rhs, tuple(window_strides), _explicit_pads(padding), tuple(lhs_dilation or (1, 1)))


def Conv(features: int, kernel_size: tuple[int, int], strides: tuple[int, int] = (1, 1),
         padding: Any = "SAME", **kw) -> nn.Conv:
    """`nn.Conv` (same parameters, names "Conv_i") computed with `conv`."""
    return nn.Conv(features, kernel_size, strides, padding=padding,
                   conv_general_dilated=flax_conv_general_dilated, **kw)


class ConvTranspose(nn.Module):
    """`nn.ConvTranspose` (transpose_kernel=False; same parameters kernel (K, K, I, O), bias (O,),
    same initialisers, names "ConvTranspose_i") computed with `conv`: a convolution of the input
    dilated by `strides`, with `padding` pairs applied as in `lax.conv_transpose`."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: Any = "VALID"

    @nn.compact
    def __call__(self, x_BxHxWxI: jax.Array) -> jax.Array:
        k = tuple(self.kernel_size)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), k + (x_BxHxWxI.shape[-1], self.features),
                            jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        if isinstance(self.padding, str):
            if self.padding.upper() != "VALID":
                raise ValueError("ConvTranspose: padding must be explicit pairs or 'VALID'")
            # lax.conv_transpose's 'VALID': total k + s - 2 + max(k - s, 0), k - 1 before.
            pads = tuple((kk - 1, kk + s - 2 + max(kk - s, 0) - (kk - 1)) for kk, s in zip(k, self.strides))
        else:
            pads = _explicit_pads(self.padding)
        y = conv(x_BxHxWxI, kernel, (1, 1), pads, tuple(self.strides))
        return y + bias


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
    """x (B, H, W, C) in [0, 1] -> q(z|x): eight convs, a (H/16)x(H/16) 'valid' conv to 1x1, dense mu, logvar."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> Posterior:
        h = x_BxHxWxC
        for features, kernel, stride in ENCODER_SPEC:
            h = _act(Conv(features, (kernel, kernel), (stride, stride), padding=_PAD1)(h))
        k = self.config.size // 16
        h = Conv(self.config.latent, (k, k), padding="VALID")(h)
        h = h.reshape(h.shape[0], -1)
        return Posterior(nn.Dense(self.config.latent, name="mu")(h),
                         nn.Dense(self.config.latent, name="logvar")(h))


class Decoder(nn.Module):
    """z (B, latent) -> logits (B, H, W, C): mirror of the encoder, upsample+conv or transposed convs."""

    config: ModelConfig

    @nn.compact
    def __call__(self, z_BxL: jax.Array) -> jax.Array:
        cfg = self.config
        k = cfg.size // 16
        h = z_BxL[:, None, None, :]

        def conv(h, f):
            return _act(Conv(f, (3, 3), padding=_PAD1)(h))

        if cfg.decoder == "upsample":  # the public PyTorch port's decoder
            h = _upsample(h, k)
            h = conv(conv(conv(h, 32), 64), 128)
            h = conv(conv(_upsample(h, 2), 64), 64)
            h = conv(conv(_upsample(h, 2), 32), 32)
            h = conv(_upsample(h, 2), 32)
            h = _upsample(h, 2)
            return Conv(cfg.channels, (3, 3), padding=_PAD1)(h)
        # Bergmann et al. 2018: transposed convs (torch padding p=1, k=4 <=> flax padding k-1-p=2).
        def up(h, f):
            return ConvTranspose(f, (4, 4), (2, 2), padding=((2, 2), (2, 2)))(h)

        h = _act(ConvTranspose(32, (k, k), padding="VALID")(h))
        h = conv(conv(h, 64), 128)
        h = conv(_act(up(h, 64)), 64)
        h = conv(_act(up(h, 32)), 32)
        h = _act(up(h, 32))
        return up(h, cfg.channels)


class VAE(nn.Module):
    """The method's VAE; `__call__` decodes the posterior mean, or a sample when `key` is given.

    Shapes: x (B, size, size, channels) in [0, 1] -> Output(logits (B, size, size, channels),
    Posterior(mu, logvar) each (B, latent)). With a Gaussian likelihood the module also owns
    the scalar parameter `log_gamma` (log of the decoder's standard deviation, Dai & Wipf 2019).
    """

    config: ModelConfig

    def setup(self) -> None:
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
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
        if key is not None:  # reparameterisation trick (training only)
            eps = jax.random.normal(key, post.mu.shape, post.mu.dtype)
            z = post.mu + jnp.exp(0.5 * post.logvar) * eps
        return Output(self.decode(z), post)


def init_params(config: ModelConfig, *, key: jax.Array) -> dict:
    """Initial parameters of `VAE(config)` for inputs (1, size, size, channels)."""
    x = jnp.zeros((1, config.size, config.size, config.channels), jnp.float32)
    return VAE(config).init(key, x)
