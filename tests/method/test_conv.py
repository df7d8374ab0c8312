"""`iepjax.xla_cpu_convs.conv` (the XLA:CPU formulations of the model's convolutions) equals `lax.conv_general_dilated`.

Each formulation of `_conv_raw` (matrix products, sub-pixel phases, im2col, col2im)
is checked against the plain lax convolution: values, input-gradient (the custom VJP, what the
projection uses) and kernel-gradient (training), on the shapes the model really produces and on
odd shapes (uneven padding, rectangular inputs and strides). Both sides of a case run in one
jitted program, as the model runs them (eagerly, each of the formulation's many ops would be compiled
alone).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iepjax import xla_cpu_convs
from conftest import bench_module
from iepjax import ModelConfig, VAE, init_params


def _lax(x, w, strides, padding, lhs_dilation):
    return jax.lax.conv_general_dilated(x, w, strides, padding, lhs_dilation=lhs_dilation,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _values_and_vjps(x, w, g, strides, padding, dilation):
    """(lax's, xla_cpu_convs') value and (dx, dw) for the cotangent g, in one compiled program, as
    the model runs them (jitted)."""
    ref, ref_vjp = jax.vjp(lambda x, w: _lax(x, w, strides, padding, dilation), x, w)
    out, out_vjp = jax.vjp(lambda x, w: xla_cpu_convs.conv(x, w, strides, padding, dilation), x, w)
    return (ref, ref_vjp(g)), (out, out_vjp(g))


def _compare(xs, ws, strides, padding, dilation, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(xs, np.float32))
    w = jnp.asarray(rng.standard_normal(ws, np.float32))
    out_shape = jax.eval_shape(lambda x, w: _lax(x, w, strides, padding, dilation), x, w).shape
    g = jnp.asarray(rng.standard_normal(out_shape, np.float32))
    strides, padding, dilation = tuple(strides), tuple(map(tuple, padding)), tuple(dilation)  # static: hashable
    (ref, ref_grads), (out, out_grads) = _values_and_vjps(x, w, g, strides, padding, dilation)
    assert out.shape == ref.shape
    scale = float(jnp.abs(ref).max())
    np.testing.assert_allclose(out, ref, atol=2e-6 * scale)
    for a, b in zip(out_grads, ref_grads):  # dx, dw
        np.testing.assert_allclose(a, b, atol=2e-6 * float(jnp.abs(b).max()))


CASES = [  # (x, w, strides, padding, lhs_dilation): which formulation
    ((2, 16, 16, 3), (4, 4, 3, 32), (2, 2), ((1, 1), (1, 1)), (1, 1)),      # im2col (first layer)
    ((2, 17, 14, 3), (4, 6, 3, 5), (2, 3), ((1, 2), (0, 1)), (1, 1)),       # im2col, uneven
    ((2, 16, 16, 8), (4, 4, 8, 16), (2, 2), ((1, 1), (1, 1)), (1, 1)),      # lax (input channels not small)
    ((2, 8, 8, 16), (4, 4, 16, 3), (1, 1), ((2, 2), (2, 2)), (2, 2)),       # col2im (last layer)
    ((2, 5, 6, 16), (4, 6, 16, 3), (1, 1), ((2, 1), (3, 4)), (2, 3)),       # col2im, uneven
    ((2, 5, 6, 16), (4, 6, 16, 1), (1, 1), ((4, 0), (6, 1)), (2, 3)),       # col2im, pads beyond the kernel
    ((2, 8, 8, 16), (4, 4, 16, 8), (1, 1), ((2, 2), (2, 2)), (2, 2)),       # phases
    ((2, 5, 7, 4), (3, 3, 4, 2), (1, 1), ((1, 1), (2, 0)), (2, 2)),         # phases impossible: lax
    ((2, 8, 8, 16), (8, 8, 16, 10), (1, 1), ((0, 0), (0, 0)), (1, 1)),      # dense: H x W -> 1 x 1
    ((2, 1, 1, 10), (8, 8, 10, 16), (1, 1), ((7, 7), (7, 7)), (1, 1)),      # dense: 1 x 1 -> k x k
    ((2, 9, 9, 4), (3, 3, 4, 5), (1, 1), ((1, 1), (1, 1)), (1, 1)),         # lax
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"x{c[0][1:]}w{c[1]}s{c[2]}d{c[4]}")
def test_conv_equals_lax(case):
    _compare(*case)


def test_every_layer_of_both_decoders_equals_lax():
    """The shapes the model produces at 32 px, 3 channels: values and both gradients."""
    common = bench_module("common")
    calls = []
    for decoder in ("upsample", "transposed"):
        cfg = ModelConfig(size=32, channels=3, decoder=decoder)
        params = init_params(cfg, key=jax.random.key(0))
        calls += common.record_convs(lambda p, x: VAE(cfg).apply(p, x), params, jnp.zeros((2, 32, 32, 3)), batch=2)
    assert len(calls) >= 30
    for i, c in enumerate(dict.fromkeys(calls)):
        _compare(*c, seed=i)
