"""Tests of iepjax.model (the VAE), its two convolution implementations, and ModelConfig validation.

Shapes are checked with `jax.eval_shape` (no compilation), so every decoder/size/channel
combination is cheap; numerical properties use the suite's 32x32 gray model. The tests that take
the `conv` fixture (conftest.py) run under both implementations ("xla_cpu", "plain"); the others
check how the two relate: the choice and its resolution, the same parameters, the same values
and gradients, forward-mode differentiation.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iepjax import ModelConfig, init_params
from iepjax import model
from iepjax.config import DECODERS
from iepjax.model import VAE


def _shapes(cfg: ModelConfig, batch: int = 2):
    x = jax.ShapeDtypeStruct((batch, cfg.size, cfg.size, cfg.channels), jnp.float32)
    variables = jax.eval_shape(lambda k, x: VAE(cfg).init(k, x), jax.random.key(0), x)
    out = jax.eval_shape(VAE(cfg).apply, variables, x)
    return variables, out


@pytest.mark.parametrize("decoder", [
    "upsample", "transposed"])
@pytest.mark.parametrize("size", [32, 48])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shapes(decoder, size, channels, conv):
    cfg = ModelConfig(size=size, channels=channels, latent=16, decoder=decoder)
    _, out = _shapes(cfg, batch=3)
    chex.assert_shape(out.logits, (3, size, size, channels))
    chex.assert_shape((out.posterior.mu, out.posterior.logvar), (3, 16))
    assert out.logits.dtype == jnp.float32


@pytest.mark.parametrize("decoder", ["upsample", "transposed"])
def test_no_batch_norm_or_batch_stats(decoder):
    variables, _ = _shapes(ModelConfig(size=32, channels=3, decoder=decoder))
    assert set(variables) == {"params"}
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(variables)]
    assert not [p for p in paths if "norm" in p.lower() or "batch" in p.lower()], paths


def test_transposed_decoder_output_shape_without_strict_promotion():
    """The transposed decoder itself works (only the strict rank-promotion setting trips it)."""
    cfg = ModelConfig(size=48, channels=3, latent=16, decoder="transposed")
    with jax.numpy_rank_promotion("allow"):
        _, out = _shapes(cfg)
    chex.assert_shape(out.logits, (2, 48, 48, 3))


def test_gaussian_likelihood_has_scalar_log_gamma():
    variables, _ = _shapes(ModelConfig(size=32, channels=1, likelihood="gaussian"))
    assert "log_gamma" in variables["params"]
    assert variables["params"]["log_gamma"].shape == ()
    bce, _ = _shapes(ModelConfig(size=32, channels=1, likelihood="bce"))
    assert "log_gamma" not in bce["params"]


def test_init_params_is_flax_init_bit_for_bit(model_cfg, params):
    """init_params (one program compiled at XLA:CPU optimisation level 1) gives flax's eager init
    exactly, for a typed and a legacy key; under a transformation (a traced key) it is flax's init
    (eval_shape: no compile); same key, same parameters, another key, others."""
    x = jnp.zeros((1, 32, 32, 1), jnp.float32)
    chex.assert_trees_all_equal(params, VAE(model_cfg).init(jax.random.key(0), x))
    chex.assert_trees_all_equal(params, init_params(model_cfg, key=jax.random.key(0)))
    chex.assert_trees_all_equal(init_params(model_cfg, key=jax.random.PRNGKey(0)), params)
    traced = jax.eval_shape(lambda k: init_params(model_cfg, key=k), jax.random.key(0))
    chex.assert_trees_all_equal_shapes_and_dtypes(traced, params)
    other = init_params(model_cfg, key=jax.random.key(1))
    assert not np.array_equal(other["params"]["encoder"]["mu"]["kernel"], params["params"]["encoder"]["mu"]["kernel"])


@pytest.fixture(scope="module")
def apply_fn(model_cfg):
    return jax.jit(VAE(model_cfg).apply)


def test_output_does_not_depend_on_batch_mates(params, apply_fn, conv):
    rng = np.random.default_rng(0)
    a, b, c = rng.random((3, 1, 32, 32, 1), dtype=np.float32)
    out_ab = apply_fn(params, jnp.concatenate([a, b]))
    out_ac = apply_fn(params, jnp.concatenate([a, c]))
    np.testing.assert_allclose(out_ab.logits[0], out_ac.logits[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out_ab.posterior.mu[0], out_ac.posterior.mu[0], atol=1e-5, rtol=0)
    # ... while the batch-mates themselves do give different outputs (the test can fail).
    assert float(jnp.max(jnp.abs(out_ab.logits[1] - out_ac.logits[1]))) > 1e-4


def test_call_decodes_posterior_mean_without_key_and_samples_with_key(params, model_cfg, apply_fn, conv):
    x = jnp.asarray(np.random.default_rng(1).random((2, 32, 32, 1), dtype=np.float32))
    vae = VAE(model_cfg)
    post = vae.apply(params, x, method=VAE.encode)
    mean_logits = vae.apply(params, post.mu, method=VAE.decode)
    np.testing.assert_allclose(apply_fn(params, x).logits, mean_logits, atol=1e-5, rtol=0)
    sampled = vae.apply(params, x, jax.random.key(1)).logits
    assert float(jnp.max(jnp.abs(sampled - mean_logits))) > 1e-4


# ------------------------------------------------------------ the two convolution implementations


def _primitives(fn, *args) -> set[str]:
    """Names of the custom-derivative and convolution primitives in the jaxpr of fn(*args) (nested ones too)."""
    return set(re.findall(r"custom_\w+|conv_general_dilated", str(jax.make_jaxpr(fn)(*args))))


def _uses(fn, *args) -> str:
    """Which implementation fn(*args) traced: the XLA:CPU one is the only one with custom VJPs."""
    return "xla_cpu" if "custom_vjp_call" in _primitives(fn, *args) else "plain"


def test_auto_is_xla_cpu_on_cpu_and_plain_on_other_platforms():
    assert model.resolve_conv("auto", platform="cpu") == "xla_cpu"
    for platform in ("gpu", "tpu", "cuda", "rocm", "METAL"):
        assert model.resolve_conv("auto", platform=platform) == "plain"
    for platform in ("cpu", "gpu"):  # an explicit choice is kept on any platform
        assert model.resolve_conv("plain", platform=platform) == "plain"
        assert model.resolve_conv("xla_cpu", platform=platform) == "xla_cpu"
    assert model.resolve_conv("auto", platform=jax.default_backend()) == model.resolve_conv("auto")
    with jax.default_device(jax.devices("cpu")[0]):  # auto follows where computations are placed
        assert model.resolve_conv("auto") == "xla_cpu"
    with pytest.raises(ValueError, match=r"conv='gpu' is not valid: choose one of auto, plain, xla_cpu"):
        model.resolve_conv("gpu")


def test_the_setting_applies_to_models_without_their_own_choice():
    """None follows the process setting (a block with `using_conv`, or the process with
    `set_default_conv`); a model's own `conv` wins over it."""
    before = model.default_conv()  # "auto", unless the suite runs under IEPJAX_CONV
    with model.using_conv("plain"):
        assert model.default_conv() == "plain" and model.resolve_conv() == "plain"
        assert model.resolve_conv("xla_cpu") == "xla_cpu"
        with model.using_conv(None):  # None keeps the setting
            assert model.resolve_conv() == "plain"
    assert model.default_conv() == before
    model.set_default_conv("plain")
    try:
        assert model.default_conv() == model.resolve_conv() == "plain"
        with model.using_conv("xla_cpu"):
            assert model.resolve_conv() == "xla_cpu"
    finally:
        model.set_default_conv(before)
    with pytest.raises(ValueError, match="choose one of"):
        model.set_default_conv("cuda")
    with model._conv_setting("fast"), pytest.raises(ValueError, match=r"IEPJAX_CONV\)='fast' is not valid"):
        model.resolve_conv()


def test_keyword_and_setting_select_the_implementation(model_cfg, params):
    x = jnp.zeros((1, 32, 32, 1), jnp.float32)
    for conv in ("plain", "xla_cpu"):
        assert _uses(VAE(model_cfg, conv=conv).apply, params, x) == conv
        with model.using_conv(conv):
            assert _uses(VAE(model_cfg).apply, params, x) == conv
        other = "plain" if conv == "xla_cpu" else "xla_cpu"
        with model.using_conv(other):
            assert _uses(VAE(model_cfg, conv=conv).apply, params, x) == conv
    assert _uses(VAE(model_cfg).apply, params, x) == model.resolve_conv()
    plain = _primitives(VAE(model_cfg, conv="plain").apply, params, x)
    assert plain == {"conv_general_dilated"}  # flax's nn.Conv / nn.ConvTranspose: no custom derivative


def test_environment_variable_sets_the_process_default():
    """IEPJAX_CONV (read when iepjax.model is imported) sets the process default; a block's setting
    and a model's keyword still override it."""
    code = ("from iepjax import model; print(model.default_conv(), model.resolve_conv());"
            "ctx = model.using_conv('xla_cpu'); ctx.__enter__(); print(model.resolve_conv())")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, model.CONV_ENV: "plain"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["plain", "plain", "xla_cpu"]


def test_jitted_functions_retrace_when_the_implementation_changes(model_cfg, params):
    """The setting is part of jax.jit's cache key: a function traced under one implementation is
    traced again under the other, and reused when the setting comes back."""
    traced = []

    @jax.jit
    def logits(p, x):
        traced.append(model.resolve_conv())
        return VAE(model_cfg).apply(p, x).logits

    x = jnp.asarray(np.random.default_rng(0).random((1, 32, 32, 1), np.float32))
    with model.using_conv("xla_cpu"):
        a = logits(params, x)
    with model.using_conv("plain"):
        b = logits(params, x)
    with model.using_conv("xla_cpu"):
        logits(params, x)
    assert traced == ["xla_cpu", "plain"]
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(a).max()))


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("channels", [1, 3])
def test_both_implementations_have_the_same_parameters(decoder, channels):
    """Same names, shapes and dtypes; the same initial values bit for bit (checked at 3 channels,
    one compiled init per implementation), so parameters move freely between the two."""
    cfg = ModelConfig(size=32, channels=channels, latent=16, decoder=decoder)
    x = jax.ShapeDtypeStruct((1, 32, 32, channels), jnp.float32)
    trees = [jax.eval_shape(VAE(cfg, conv=c).init, jax.random.key(0), x) for c in ("xla_cpu", "plain")]
    chex.assert_trees_all_equal_shapes_and_dtypes(*trees)
    assert jax.tree.structure(trees[0]) == jax.tree.structure(trees[1])
    if channels == 3:
        values = []
        for c in ("xla_cpu", "plain"):
            with model.using_conv(c):
                values.append(init_params(cfg, key=jax.random.key(0)))
        chex.assert_trees_all_equal(*values)


def _random_params(cfg: ModelConfig, rng: np.random.Generator) -> dict:
    """Parameters of VAE(cfg) drawn with numpy (nothing compiled): kernels at He scale, biases non-zero."""
    x = jax.ShapeDtypeStruct((1, cfg.size, cfg.size, cfg.channels), jnp.float32)
    tree = jax.eval_shape(VAE(cfg).init, jax.random.key(0), x)

    def draw(leaf):
        scale = np.sqrt(2.0 / np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0.1
        return jnp.asarray(scale * rng.standard_normal(leaf.shape), jnp.float32)
    return jax.tree.map(draw, tree)


def _model_vjp(cfg, conv):
    """jit of (p, x, cotangents) -> ((logits, mu, logvar), (d/dp, d/dx)) of VAE(cfg, conv)."""
    def fwd(p, x):
        out = VAE(cfg, conv=conv).apply(p, x)
        return out.logits, out.posterior.mu, out.posterior.logvar

    def f(p, x, cts):
        y, vjp = jax.vjp(fwd, p, x)
        return y, vjp(cts)
    return jax.jit(f)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("channels", [1, 3])
def test_implementations_agree_on_values_and_gradients(decoder, channels):
    """logits, mu, logvar and their vector-Jacobian products with respect to the parameters and to x
    agree to float32 rounding (each array to 1e-5 of its largest magnitude)."""
    cfg = ModelConfig(size=32, channels=channels, latent=16, decoder=decoder)
    rng = np.random.default_rng(channels)
    params = _random_params(cfg, rng)
    x = jnp.asarray(rng.random((2, 32, 32, channels), np.float32))
    cts = (jnp.asarray(rng.standard_normal((2, 32, 32, channels), np.float32)),
           jnp.asarray(rng.standard_normal((2, 16), np.float32)), jnp.asarray(rng.standard_normal((2, 16), np.float32)))
    ref = _model_vjp(cfg, "xla_cpu")(params, x, cts)
    got = _model_vjp(cfg, "plain")(params, x, cts)
    assert jax.tree.structure(ref) == jax.tree.structure(got)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(got)):
        scale = float(jnp.abs(a).max())
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_forward_mode_differentiation_through_the_plain_model(model_cfg, params):
    """`jax.jvp` through the plain model gives the directional derivative that reverse mode gives
    (<J v, u> = <v, J^T u>); the XLA:CPU formulation, a custom VJP, has no forward mode."""
    rng = np.random.default_rng(3)
    x, v = (jnp.asarray(a) for a in rng.random((2, 1, 32, 32, 1), np.float32))
    u = jnp.asarray(rng.standard_normal((1, 32, 32, 1), np.float32))

    def f(conv):
        return lambda x: VAE(model_cfg, conv=conv).apply(params, x).logits

    @jax.jit
    def both(x, v, u):
        _, jv = jax.jvp(f("plain"), (x,), (v,))
        _, vjp = jax.vjp(f("plain"), x)
        return jv, jnp.vdot(jv, u), jnp.vdot(v, vjp(u)[0])

    jv, forward, reverse = both(x, v, u)
    np.testing.assert_allclose(float(forward), float(reverse), rtol=1e-4)
    assert float(jnp.abs(jv).max()) > 0
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jit(lambda x, v: jax.jvp(f("xla_cpu"), (x,), (v,))).lower(x, v)  # fails when lowered


@pytest.mark.parametrize("size", [0, 16, 40, 100, 130])
def test_config_rejects_size_not_multiple_of_16(size):
    with pytest.raises(ValueError, match=r"multiple of 16"):
        ModelConfig(size=size)


@pytest.mark.parametrize("channels", [0, 2, 4])
def test_config_rejects_channels_other_than_1_or_3(channels):
    with pytest.raises(ValueError, match=r"channels=%d.*1 \(gray\) or 3 \(RGB\)" % channels):
        ModelConfig(channels=channels)


@pytest.mark.parametrize("field,value", [("decoder", "deconv"), ("likelihood", "mse")])
def test_config_rejects_unknown_choice_listing_the_valid_ones(field, value):
    with pytest.raises(ValueError, match=r"choose one of"):
        ModelConfig(**{field: value})


def test_configs_are_hashable_static_arguments():
    assert hash(ModelConfig(size=32)) == hash(ModelConfig(size=32))
    assert ModelConfig(size=32) != ModelConfig(size=48)
