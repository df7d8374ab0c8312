"""Tests of iepjax.model (the VAE) and ModelConfig validation.

Shapes are checked with `jax.eval_shape` (no compilation), so every decoder/size/channel
combination is cheap; numerical properties use the suite's 32x32 gray model.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iepjax import ModelConfig, init_params
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
def test_output_shapes(decoder, size, channels):
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


def test_output_does_not_depend_on_batch_mates(params, apply_fn):
    rng = np.random.default_rng(0)
    a, b, c = rng.random((3, 1, 32, 32, 1), dtype=np.float32)
    out_ab = apply_fn(params, jnp.concatenate([a, b]))
    out_ac = apply_fn(params, jnp.concatenate([a, c]))
    np.testing.assert_allclose(out_ab.logits[0], out_ac.logits[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out_ab.posterior.mu[0], out_ac.posterior.mu[0], atol=1e-5, rtol=0)
    # ... while the batch-mates themselves do give different outputs (the test can fail).
    assert float(jnp.max(jnp.abs(out_ab.logits[1] - out_ac.logits[1]))) > 1e-4


def test_call_decodes_posterior_mean_without_key_and_samples_with_key(params, model_cfg, apply_fn):
    x = jnp.asarray(np.random.default_rng(1).random((2, 32, 32, 1), dtype=np.float32))
    vae = VAE(model_cfg)
    post = vae.apply(params, x, method=VAE.encode)
    mean_logits = vae.apply(params, post.mu, method=VAE.decode)
    np.testing.assert_allclose(apply_fn(params, x).logits, mean_logits, atol=1e-5, rtol=0)
    sampled = vae.apply(params, x, jax.random.key(1)).logits
    assert float(jnp.max(jnp.abs(sampled - mean_logits))) > 1e-4


@pytest.mark.parametrize("size", [0, 16, 40, 100, 130])
def test_config_rejects_size_not_multiple_of_16(size):
    with pytest.raises(ValueError, match=r"multiple of 16"):
        ModelConfig(size=size)


@pytest.mark.parametrize("channels", [0, 2, 4])
def test_config_rejects_channels_other_than_1_or_3(channels):
    with pytest.raises(ValueError, match=r"channels=%d.*1 \(gray\) or 3 \(RGB\)" % channels):
        ModelConfig(channels=channels)


@pytest.mark.parametrize("field,value", [("decoder", "deconv"), ("likelihood", "l2")])
def test_config_rejects_unknown_choice_listing_the_valid_ones(field, value):
    with pytest.raises(ValueError, match=r"choose one of"):
        ModelConfig(**{field: value})


def test_configs_are_hashable_static_arguments():
    assert hash(ModelConfig(size=32)) == hash(ModelConfig(size=32))
    assert ModelConfig(size=32) != ModelConfig(size=48)
