"""Tests of iepjax.losses (the model's loss, against independent formulas) and iepjax.energy
(E(x) = L_r(x) + lam ||x - x0||_1, paper eq. 3), including its gradient through the network.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from iepjax import ProjectionConfig
from iepjax.energy import energy
from iepjax import losses
from iepjax.config import ModelConfig
from iepjax.losses import model_loss
from iepjax.model import VAE

from conftest import central_differences

# ----------------------------------------------------------------------------------- losses


def _sigmoid64(l):
    return 1.0 / (1.0 + np.exp(-np.asarray(l, np.float64)))


def test_bce_sum_matches_direct_formula():
    rng = np.random.default_rng(0)
    logits = rng.uniform(-6, 6, (8, 8, 3)).astype(np.float32)
    x = rng.random((8, 8, 3)).astype(np.float32)
    f = _sigmoid64(logits)
    want = -np.sum(x * np.log(f) + (1 - x) * np.log(1 - f))
    np.testing.assert_allclose(float(losses.bce_sum(logits, x)), want, rtol=1e-5)


def test_bce_sum_is_stable_for_saturated_logits():
    logits = jnp.array([[[-200.0], [200.0]]])
    x = jnp.array([[[0.0], [1.0]]])
    value = float(losses.bce_sum(logits, x))
    assert np.isfinite(value) and value == pytest.approx(0.0, abs=1e-6)


def test_kl_is_zero_for_the_prior():
    assert float(losses.kl_divergence(jnp.zeros(7), jnp.zeros(7))) == 0.0


def test_kl_matches_formula():
    rng = np.random.default_rng(1)
    mu, logvar = rng.normal(size=(2, 10)).astype(np.float32)
    want = 0.5 * np.sum(mu.astype(np.float64) ** 2 + np.exp(logvar.astype(np.float64)) - 1.0 - logvar)
    got = float(losses.kl_divergence(mu, logvar))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got > 0


@pytest.mark.parametrize("log_gamma", [-2.0, 0.0, 0.7])
def test_gaussian_nll_matches_scipy(log_gamma):
    rng = np.random.default_rng(2)
    logits = rng.uniform(-3, 3, (6, 6, 1)).astype(np.float32)
    x = rng.random((6, 6, 1)).astype(np.float32)
    want = -np.sum(stats.norm.logpdf(x, loc=_sigmoid64(logits), scale=np.exp(log_gamma)))
    got = float(losses.gaussian_nll_sum(logits, x, jnp.float32(log_gamma)))
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("model_kl,use_kl,has_kl", [(True, True, True), (True, False, False), (False, True, False)])
def test_model_loss_kl_switches(model_kl, use_kl, has_kl):
    rng = np.random.default_rng(3)
    logits, x = rng.normal(size=(2, 4, 4, 1)).astype(np.float32)
    x = np.clip(x, 0, 1)
    mu, logvar = rng.normal(size=(2, 5)).astype(np.float32)
    cfg = ModelConfig(size=32, channels=1, use_kl=model_kl)
    t = model_loss(logits, x, mu, logvar, jnp.zeros(()), cfg, use_kl=use_kl)
    np.testing.assert_allclose(float(t.recon), float(losses.bce_sum(logits, x)), rtol=1e-6)
    kl = float(losses.kl_divergence(mu, logvar))
    assert float(t.kl) == (pytest.approx(kl, rel=1e-6) if has_kl else 0.0)
    np.testing.assert_allclose(float(t.total), float(t.recon) + float(t.kl), rtol=1e-6)


def test_reconstruction_loss_dispatches_on_likelihood():
    rng = np.random.default_rng(4)
    logits, x = rng.random((2, 4, 4, 1)).astype(np.float32)
    lg = jnp.float32(-1.0)
    bce = ModelConfig(size=32, channels=1, likelihood="bce")
    gauss = ModelConfig(size=32, channels=1, likelihood="gaussian")
    assert float(losses.reconstruction_loss(logits, x, lg, bce)) == float(losses.bce_sum(logits, x))
    assert float(losses.reconstruction_loss(logits, x, lg, gauss)) == float(losses.gaussian_nll_sum(logits, x, lg))


@pytest.mark.parametrize("likelihood", ["bce", "gaussian"])
def test_constant_prediction_loss_is_the_per_pixel_loss_of_the_channel_mean(likelihood):
    rng = np.random.default_rng(5)
    x = rng.random((4, 8, 8, 3)).astype(np.float32) * np.array([0.3, 0.6, 1.0], np.float32)
    m = x.astype(np.float64).mean(axis=(0, 1, 2))
    if likelihood == "bce":
        want = -np.mean(x * np.log(m) + (1 - x) * np.log(1 - m))
    else:
        want = np.mean((x - m) ** 2)
    got = losses.constant_prediction_loss(x, ModelConfig(size=32, channels=3, likelihood=likelihood))
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ----------------------------------------------------------------------------------- energy
# The property tests below that take the `conv` fixture run under both implementations of the
# model's convolutions; the finite-difference check (float64, a trained model) runs the default
# one: test_model.py checks that the two give the same gradients.


@pytest.fixture(scope="module")
def energy_jit():
    return jax.jit(energy, static_argnames="config")


@pytest.fixture(scope="module")
def energy_grad():
    """jit of (params, x, x0, config) -> dE/dx (E: `energy`), the reference gradient of the tests below."""
    return jax.jit(jax.grad(lambda params, x, x0, config: energy(params, x, x0, config)[0], argnums=1),
                   static_argnames="config")


@pytest.fixture(scope="module")
def images():
    """x0 and x = x0 + a perturbation of magnitude >= 0.05 (away from the L1 kink), in (0.05, 0.95)."""
    rng = np.random.default_rng(10)
    x0 = rng.uniform(0.15, 0.85, (32, 32, 1)).astype(np.float32)
    x = x0 + rng.choice([-1.0, 1.0], x0.shape).astype(np.float32) * rng.uniform(0.05, 0.1, x0.shape).astype(np.float32)
    return x0, x


def test_prior_term_is_lam_times_l1_distance(params, model_cfg, energy_jit, images):
    x0, x = images
    cfg = ProjectionConfig(model=model_cfg, lam=0.37)
    e, aux = energy_jit(params, x, x0, cfg)
    l1 = np.sum(np.abs(x.astype(np.float64) - x0))
    np.testing.assert_allclose(float(aux.prior), 0.37 * l1, rtol=1e-5)
    e0, _ = energy_jit(params, x, x0, dataclasses.replace(cfg, lam=0.0))
    np.testing.assert_allclose(float(e) - float(e0), 0.37 * l1, rtol=1e-3)
    e_at_x0, aux_x0 = energy_jit(params, x0, x0, cfg)
    assert float(aux_x0.prior) == 0.0


def test_prior_gradient_is_sign_and_zero_at_x0(params, model_cfg, energy_grad, images):
    """The L1 prior's (sub)gradient is lam * sign(x - x0), 0 where x = x0 (as PyTorch's abs), so the
    first step from x0 is the model loss's alone (jax.grad(jnp.abs)(0.) would be 1)."""
    x0, x = images
    def grad(x, cfg):
        return energy_grad(params, x, jnp.asarray(x0), config=cfg)
    cfg = ProjectionConfig(model=model_cfg, lam=0.37)
    no_prior = dataclasses.replace(cfg, lam=0.0)
    np.testing.assert_allclose(np.asarray(grad(jnp.asarray(x0), cfg)), np.asarray(grad(jnp.asarray(x0), no_prior)),
                               rtol=1e-6, atol=1e-7)
    diff = np.asarray(grad(jnp.asarray(x), cfg)) - np.asarray(grad(jnp.asarray(x), no_prior))
    np.testing.assert_allclose(diff, 0.37 * np.sign(x - x0), rtol=1e-4, atol=1e-4)


def test_direction_at_x0_is_the_least_magnitude_subgradient(params, model_cfg, energy_grad, images):
    """Where x = x0 the update uses g_r - clip(g_r, -lam, lam) (g_r = grad of the model loss), the
    subgradient of E of least magnitude: pixels whose |g_r| <= lam stay at x0 (exactly 0), the others
    move by g_r shrunk by lam; where x != x0 it is grad E itself. Checked pixel by pixel against
    jax.grad of the energy without the prior."""
    from iepjax.projection import descent_direction

    x0, x = images
    lam = 0.37
    cfg = ProjectionConfig(model=model_cfg, lam=lam, weighting=False)
    g_r = np.asarray(energy_grad(params, jnp.asarray(x0), jnp.asarray(x0), config=dataclasses.replace(cfg, lam=0.0)))
    assert (np.abs(g_r) <= lam).any() and (np.abs(g_r) > lam).any()  # both cases occur
    _, d0 = jax.jit(descent_direction, static_argnums=3)(params, jnp.asarray(x0), jnp.asarray(x0), cfg)
    expected = np.sign(g_r) * np.maximum(np.abs(g_r) - lam, 0.0)
    np.testing.assert_allclose(np.asarray(d0), expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(d0)[np.abs(g_r) <= lam] == 0.0)
    # away from x0 (every pixel of x differs from x0): the plain gradient of E
    _, d = jax.jit(descent_direction, static_argnums=3)(params, jnp.asarray(x), jnp.asarray(x0), cfg)
    g = np.asarray(energy_grad(params, jnp.asarray(x), jnp.asarray(x0), config=cfg))
    np.testing.assert_allclose(np.asarray(d), g, rtol=1e-5, atol=1e-6)


def test_energy_is_the_model_loss_at_the_posterior_mean_plus_prior(params, model_cfg, energy_jit, images):
    x0, x = images
    cfg = ProjectionConfig(model=model_cfg, lam=0.05, use_kl=True)
    e, aux = energy_jit(params, x, x0, cfg)
    out = VAE(model_cfg).apply(params, x[None])  # no key: posterior mean
    terms = model_loss(out.logits[0], x, out.posterior.mu[0], out.posterior.logvar[0], jnp.zeros(()), model_cfg)
    np.testing.assert_allclose(float(aux.recon), float(terms.recon), rtol=1e-5)
    np.testing.assert_allclose(float(aux.kl), float(terms.kl), rtol=1e-4)
    assert float(aux.kl) > 0
    np.testing.assert_allclose(float(e), float(aux.recon + aux.kl + aux.prior), rtol=1e-6)
    np.testing.assert_allclose(aux.recon_image, jax.nn.sigmoid(out.logits[0]), atol=1e-6)


def test_without_kl_the_kl_term_is_zero(params, model_cfg, energy_jit, images):
    x0, x = images
    cfg = ProjectionConfig(model=model_cfg, lam=0.05, use_kl=False)
    e, aux = energy_jit(params, x, x0, cfg)
    assert float(aux.kl) == 0.0
    np.testing.assert_allclose(float(e), float(aux.recon + aux.prior), rtol=1e-6)
    e_kl, aux_kl = energy_jit(params, x, x0, dataclasses.replace(cfg, use_kl=True))
    np.testing.assert_allclose(float(e_kl) - float(e), float(aux_kl.kl), atol=2e-4)  # float32 sums of ~700
    assert float(aux_kl.kl) > 0


def _detached_energy(params, x, x0, config):
    """E with the network's outputs treated as constants (the wrong, 'detached' gradient of one port)."""
    out = jax.lax.stop_gradient(VAE(config.model).apply(params, x[None]))
    terms = model_loss(out.logits[0], x, out.posterior.mu[0], out.posterior.logvar[0], jnp.zeros((), x.dtype),
                       config.model, use_kl=config.use_kl)
    return terms.total + config.lam * jnp.sum(jnp.abs(x - x0))


def test_gradient_matches_finite_differences_through_the_network(trained, model_cfg, images):
    """d/dx E along random directions == central differences (float64), and != the detached gradient.

    Uses the briefly trained model: at initialisation f hardly depends on x, so the two gradients
    differ by ~1% only.
    """
    params, _ = trained
    x0, x = images
    cfg = ProjectionConfig(model=model_cfg, lam=0.05)
    eps = 1e-5
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x64, x064 = jnp.asarray(x, jnp.float64), jnp.asarray(x0, jnp.float64)
        e_fn = jax.jit(lambda x: energy(p64, x, x064, cfg)[0])
        g = jax.jit(jax.grad(lambda x: energy(p64, x, x064, cfg)[0]))(x64)
        g_det = jax.jit(jax.grad(lambda x: _detached_energy(p64, x, x064, cfg)))(x64)
        assert g.dtype == jnp.float64
        for v, fd in central_differences(e_fn, x64, eps):
            dd = float(jnp.vdot(g, v))
            dd_det = float(jnp.vdot(g_det, v))
            np.testing.assert_allclose(dd, fd, rtol=1e-4, atol=1e-6)
            # the detached gradient misses the finite difference by orders of magnitude more
            assert abs(dd_det - fd) > 1000 * abs(dd - fd) + 1e-6, (dd, dd_det, fd)
        # The gradient through f differs from the detached one as a whole, not only along v.
        rel = float(jnp.linalg.norm(g - g_det) / jnp.linalg.norm(g))
    assert rel > 0.1, rel

