"""Tests of the paper's three models (docs/method.md, Models): the SSIM loss against scikit-image,
the deterministic AEs, the energy's gradient for each model (finite differences), the detached
gradient (the ports' ablation), the plain rows' maps, and one compiled scan per model.
"""
from __future__ import annotations

import dataclasses
import functools

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from iepjax import ProjectionConfig, projection
from iepjax import losses
from iepjax.anomaly_maps import recon_map
from iepjax.config import MODELS, ModelConfig, TrainConfig, model_config, split_traced
from iepjax.energy import energy, reconstruct
from iepjax.model import VAE, init_params
from iepjax.training_step import batch_loss, image_loss

from conftest import SIZE, central_differences, nested_jaxprs, pattern_images

BASE = ModelConfig(size=SIZE, channels=1, likelihood="gaussian", decoder="transposed")


def _cfg(model: str) -> ModelConfig:
    return model_config(model, BASE)


@functools.cache
def _params(model: str) -> dict:
    return init_params(_cfg(model), key=jax.random.key(3))


def _skimage_ssim(a, b):
    return structural_similarity(a.astype(np.float64), b.astype(np.float64), gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=1.0, win_size=11, full=True)


# ------------------------------------------------------------------------------------- SSIM


@pytest.mark.parametrize("shape", [(32, 32, 1), (40, 27, 3)])
def test_ssim_map_matches_skimage_on_random_images(shape):
    """Same window (11x11 Gaussian, std 1.5), K1/K2, data range 1, population variances: the map equals
    skimage's full map (its borders extended the same way), and its mean over the region away from the
    borders equals skimage's SSIM, channel by channel."""
    rng = np.random.default_rng(0)
    a = rng.random(shape).astype(np.float32)
    b = np.clip(a + 0.3 * rng.standard_normal(shape), 0, 1).astype(np.float32)
    got = np.asarray(losses.ssim_map(jnp.asarray(a), jnp.asarray(b)))
    assert got.shape == shape
    for c in range(shape[-1]):
        mssim, full = _skimage_ssim(a[..., c], b[..., c])
        np.testing.assert_allclose(got[..., c], full, atol=1e-5)
        assert float(got[5:-5, 5:-5, c].mean()) == pytest.approx(mssim, abs=1e-5)
    # away from the borders it is dm_pix's own SSIM map (its default 'valid' Gaussian filter)
    np.testing.assert_allclose(got[5:-5, 5:-5], np.asarray(dm_pix.ssim(a, b, return_map=True)), atol=1e-5)


def test_ssim_loss_is_the_summed_one_minus_ssim_map():
    rng = np.random.default_rng(1)
    x, f = rng.random((2, 32, 32, 3)).astype(np.float32)
    want = sum(np.sum(1.0 - _skimage_ssim(x[..., c], f[..., c])[1]) for c in range(3))
    assert float(losses.ssim_loss_sum(jnp.asarray(f), jnp.asarray(x))) == pytest.approx(want, rel=1e-5)
    assert float(losses.ssim_loss_sum(jnp.asarray(x), jnp.asarray(x))) == pytest.approx(0.0, abs=1e-3)


def test_l2_and_ssim_losses_are_dispatched_on_the_likelihood():
    rng = np.random.default_rng(2)
    logits, x = rng.normal(size=(2, 32, 32, 1)).astype(np.float32)
    x = np.clip(x, 0, 1)
    f = jax.nn.sigmoid(logits)
    l2 = losses.reconstruction_loss(logits, x, jnp.zeros(()), _cfg("ae_l2"))
    assert float(l2) == pytest.approx(float(np.sum((x - np.asarray(f)) ** 2)), rel=1e-5)
    ss = losses.reconstruction_loss(logits, x, jnp.zeros(()), _cfg("ae_ssim"))
    assert float(ss) == pytest.approx(float(losses.ssim_loss_sum(f, x)), rel=1e-6)


# ------------------------------------------------------------------------------- the models


def test_model_names_and_configs():
    assert model_config("vae", BASE) == BASE  # the VAE's config is exactly the base one
    assert [model_config(m, BASE).model_name for m in MODELS] == ["vae", "ae_l2", "ae_ssim"]
    assert ModelConfig().model_name == "vae" and not ModelConfig().deterministic
    assert ModelConfig(likelihood="bce", use_kl=False).model_name == "vae"  # a VAE trained without KL stays "vae"
    assert _cfg("ae_ssim").likelihood == "ssim" and not _cfg("ae_ssim").use_kl
    with pytest.raises(ValueError, match="use_kl=False"):
        ModelConfig(likelihood="l2")  # an AE's loss with a KL term is refused
    with pytest.raises(ValueError, match="vae, ae_l2, ae_ssim"):
        model_config("ae", BASE)
    with pytest.raises(ValueError, match="full, detached"):
        ProjectionConfig(gradient="stopped")


@pytest.mark.parametrize("model", ["ae_l2", "ae_ssim"])
def test_the_ae_has_no_kl_and_is_deterministic(model):
    cfg = _cfg(model)
    params = _params(model)
    enc = params["params"]["encoder"]
    assert "mu" in enc and "logvar" not in enc  # no posterior variance head
    assert "log_gamma" not in params["params"]  # no likelihood scale either
    vae_enc = _params("vae")["params"]["encoder"]
    assert set(vae_enc) - set(enc) == {"logvar"}  # otherwise the VAE's encoder and decoder
    x = jnp.asarray(pattern_images(3))
    out = VAE(cfg).apply(params, x)
    np.testing.assert_array_equal(np.asarray(out.posterior.logvar), 0.0)
    sampled = VAE(cfg).apply(params, x, jax.random.key(5))  # a key changes nothing: z = mu
    np.testing.assert_array_equal(np.asarray(sampled.logits), np.asarray(out.logits))
    terms = image_loss(params, x[0], cfg, key=jax.random.key(1))
    assert float(terms.kl) == 0.0 and float(terms.total) == float(terms.recon)
    l1, a1 = batch_loss(params, x, cfg, key=jax.random.key(0))
    l2, a2 = batch_loss(params, x, cfg, key=jax.random.key(9))
    assert float(l1) == float(l2) and float(a1.terms.kl) == 0.0  # no sampling: the key does not matter


def test_the_vae_params_tree_is_unchanged():
    """The VAE keeps its logvar head and log_gamma: its checkpoints and numbers are as before."""
    p = _params("vae")["params"]
    assert {"mu", "logvar"} <= set(p["encoder"]) and "log_gamma" in p


@pytest.mark.parametrize("model", MODELS)
def test_a_train_step_runs_for_each_model(model):
    from iepjax import training
    cfg = TrainConfig(model=_cfg(model), steps=2, batch_size=2, augment=False)
    state = training.init_state(cfg, key=jax.random.key(0))
    x = jnp.asarray(np.round(pattern_images(2) * 255).astype(np.uint8))
    state, terms = training.train_step(state, x, cfg)
    assert np.isfinite(float(terms.total))
    assert (float(terms.kl) == 0.0) == (model != "vae")


# ------------------------------------------------------------------------------- the energy


def _x_pair():
    x0 = jnp.asarray(pattern_images(1, seed=4)[0])
    x = jnp.clip(x0 + 0.05 * jnp.asarray(np.random.default_rng(6).standard_normal(x0.shape), jnp.float32), 0.01, 0.99)
    return x0, x


@pytest.mark.parametrize("model", MODELS)
def test_energy_gradient_matches_finite_differences_for_each_model(model):
    """d/dx E (through the network) along random directions == central differences, in float64."""
    cfg = ProjectionConfig(model=_cfg(model), lam=0.5)
    x0, x = _x_pair()
    eps = 1e-5
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), _params(model))
        x64, x064 = jnp.asarray(x, jnp.float64), jnp.asarray(x0, jnp.float64)
        e_fn = jax.jit(lambda x: energy(p64, x, x064, cfg)[0])
        g = jax.jit(jax.grad(lambda x: energy(p64, x, x064, cfg)[0]))(x64)
        assert g.dtype == jnp.float64
        for v, fd in central_differences(e_fn, x64, eps):
            np.testing.assert_allclose(float(jnp.vdot(g, v)), fd, rtol=1e-4, atol=1e-7)


def _detached_formula(model: str, params, x, x0, lam):
    """grad_x E with f held constant, written out: Gaussian (x - f) / gamma^2, L2 2 (x - f), SSIM the
    derivative of sum(1 - SSIM(x, f)) in x alone; plus lam sign(x - x0)."""
    cfg = _cfg(model)
    f = reconstruct(params, x, ProjectionConfig(model=cfg))
    if model == "vae":
        gamma2 = jnp.exp(2.0 * params["params"]["log_gamma"])
        g = (x - f) / gamma2
    elif model == "ae_l2":
        g = 2.0 * (x - f)
    else:
        g = jax.grad(lambda y: losses.ssim_loss_sum(f, y))(x)
    return g + lam * jnp.sign(x - x0)


@pytest.mark.parametrize("model", MODELS)
def test_detached_gradient_is_the_formula_with_f_held_constant(model):
    params = _params(model)
    if model == "vae":  # a gamma other than 1, so the formula's 1 / gamma^2 is tested
        params = jax.tree.map(lambda a: a, params)
        params["params"]["log_gamma"] = jnp.float32(-1.3)
    x0, x = _x_pair()
    cfg = ProjectionConfig(model=_cfg(model), lam=0.5, gradient="detached")
    g_det = jax.grad(lambda y: energy(params, y, x0, cfg)[0])(x)
    want = _detached_formula(model, params, x, x0, 0.5)
    np.testing.assert_allclose(np.asarray(g_det), np.asarray(want), rtol=2e-4, atol=1e-5)
    # the value is the same; the full gradient is another one (f depends on x)
    full = dataclasses.replace(cfg, gradient="full")
    assert float(energy(params, x, x0, full)[0]) == float(energy(params, x, x0, cfg)[0])
    g_full = jax.grad(lambda y: energy(params, y, x0, full)[0])(x)
    assert float(jnp.linalg.norm(g_full - g_det)) > 1e-4 * float(jnp.linalg.norm(g_det))


def test_detached_vae_energy_has_no_kl_gradient():
    params = _params("vae")
    x0, x = _x_pair()
    cfg = ProjectionConfig(model=_cfg("vae"), lam=0.0, gradient="detached")
    g_kl = jax.grad(lambda y: energy(params, y, x0, cfg)[0])(x)
    g_nokl = jax.grad(lambda y: energy(params, y, x0, dataclasses.replace(cfg, use_kl=False))[0])(x)
    np.testing.assert_array_equal(np.asarray(g_kl), np.asarray(g_nokl))


# ----------------------------------------------------------------------- maps and the program


@pytest.mark.parametrize("model", MODELS)
def test_plain_row_map_of_each_model(model):
    params = _params(model)
    x0 = jnp.asarray(pattern_images(1, seed=8)[0])
    cfg = ProjectionConfig(model=_cfg(model), smoothing_sigma=0.0)
    f = np.asarray(reconstruct(params, x0, cfg), np.float64)
    x = np.asarray(x0, np.float64)
    got = np.asarray(recon_map(params, x0, cfg))
    if model == "vae":
        want = np.abs(x - f).mean(-1)
    elif model == "ae_l2":
        want = ((x - f) ** 2).mean(-1)
    else:
        want = 1.0 - _skimage_ssim(x[..., 0], f[..., 0])[1]
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("gradient", ["full", "detached"])
def test_project_fn_compiles_one_scan_for_each_model(gradient):
    x = jnp.asarray(pattern_images(2))
    n0 = projection._project_batch._cache_size()
    for model in MODELS:
        cfg = ProjectionConfig(model=_cfg(model), steps=3, alpha=1e-3, lam=0.1, gradient=gradient)
        key, values = split_traced(cfg)
        closed = jax.make_jaxpr(functools.partial(projection._project_batch, config=key, values=values))(_params(model), x)
        scans = [e for j in nested_jaxprs(closed.jaxpr) for e in j.eqns if e.primitive.name == "scan"]
        assert len(scans) == 1 and scans[0].params["length"] == 3
        res = projection.project_fn(_params(model), x, cfg)
        assert res.x_T.shape == x.shape and np.isfinite(np.asarray(res.energies)).all()
        projection.project_fn(_params(model), x, cfg)  # the same program again: no new compile
    assert projection._project_batch._cache_size() - n0 == len(MODELS)


def test_presets_give_each_model_the_same_architecture_and_its_own_projection_scale():
    from iepjax import presets
    from iepjax.presets import LIKELIHOOD_PROJECTION

    vae = presets.train_config("textures", "brick")
    assert presets.train_config("textures", "brick", model="vae") == vae  # the VAE's config unchanged
    for model, loss in (("ae_l2", "l2"), ("ae_ssim", "ssim")):
        t = presets.train_config("textures", "brick", model=model)
        assert t.model == dataclasses.replace(vae.model, likelihood=loss, use_kl=False)
        assert dataclasses.replace(t, model=vae.model) == vae  # same steps, batch, lr, augmentation
        p = presets.projection_config("textures", "brick", loss)
        assert (p.alpha, p.lam) == (LIKELIHOOD_PROJECTION[loss]["alpha"], LIKELIHOOD_PROJECTION[loss]["lam"])
        assert (p.step, p.hold) == (LIKELIHOOD_PROJECTION[loss]["step"], LIKELIHOOD_PROJECTION[loss]["hold"])
        assert p.gradient == "full"
