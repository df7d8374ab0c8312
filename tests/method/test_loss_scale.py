"""Projection settings in units of the model's loss (iepjax.loss_scale; docs/method.md, Projection)."""
from __future__ import annotations

import dataclasses
import inspect
import math

import jax
import numpy as np
import pytest

from conftest import SIZE, pattern_images
from iepjax import ModelConfig, ProjectionConfig, init_params, loss_scale, project_fn

C = 3.0  # the factor the loss is multiplied by


@pytest.fixture(scope="module")
def gaussian():
    """A tiny Gaussian-likelihood model, and the same model whose loss is C times larger.

    With the Gaussian likelihood L_r = sum (x - f)^2 / (2 gamma^2) + D log gamma + const, so
    gamma^2 / C multiplies every x-dependent term, and every gradient, by C (the KL term is left
    out of the energy: it does not scale with gamma).
    """
    model = ModelConfig(size=SIZE, channels=1, likelihood="gaussian", decoder="transposed")
    params = init_params(model, key=jax.random.key(2))
    top = dict(params["params"])
    top["log_gamma"] = top["log_gamma"] - 0.5 * math.log(C)
    scaled = dict(params, params=top)
    cfg = ProjectionConfig(model=model, steps=8, use_kl=False, smoothing_sigma=0.0)
    return params, scaled, cfg


def test_resolved_settings_follow_the_loss_scale_and_give_the_same_projection(gaussian):
    params, scaled, cfg = gaussian
    normal, test = pattern_images(4, seed=1), pattern_images(3, phase=0.5, seed=3)
    rel = dataclasses.replace(cfg, step=2e-3, hold=0.4)
    a_cfg, a_rec = loss_scale.resolve(params, rel, normal)
    b_cfg, b_rec = loss_scale.resolve(scaled, rel, normal)
    assert a_cfg.resolved and b_cfg.resolved and a_rec["step"] == 2e-3 and a_rec["hold"] == 0.4
    assert b_cfg.alpha == pytest.approx(a_cfg.alpha / C, rel=1e-4)
    assert b_cfg.lam == pytest.approx(a_cfg.lam * C, rel=1e-4)
    assert b_rec["scale"]["weight_mean"] == pytest.approx(a_rec["scale"]["weight_mean"], rel=1e-6)
    a, b = project_fn(params, test, a_cfg), project_fn(scaled, test, b_cfg)
    moved = np.abs(np.asarray(a.x_T) - test).max()
    assert moved > 1e-3  # the projection did move the images
    # the same trajectory up to float32 rounding of gradients C times larger, against steps C times shorter
    np.testing.assert_allclose(np.asarray(b.x_T), np.asarray(a.x_T), atol=1e-5 + 1e-3 * moved, rtol=0)
    # the constants, not resolved again, give another projection: the check above can fail
    c = project_fn(scaled, test, a_cfg)
    assert np.abs(np.asarray(c.x_T) - np.asarray(a.x_T)).max() > 10 * (1e-5 + 1e-3 * moved)


def test_hold_is_the_fraction_of_normal_pixels_the_prior_keeps_at_x0(gaussian):
    """At the first step a pixel at x0 moves only where |dL_r/dx| > lam: with lam resolved for `hold`,
    that fraction of the normal images' pixels stays put."""
    params, _, cfg = gaussian
    normal = pattern_images(4, seed=1)
    for hold in (0.2, 0.6):
        resolved, _ = loss_scale.resolve(params, dataclasses.replace(cfg, steps=1, backtrack=False, hold=hold), normal)
        assert resolved.alpha == cfg.alpha  # no step given: alpha as it was
        x1 = np.asarray(project_fn(params, normal, resolved).x_T)
        assert np.mean(x1 == normal) == pytest.approx(hold, abs=0.01)


def test_measuring_any_number_of_images_compiles_one_program(gaussian):
    """The last batch is padded to the others' size (`sharding.fixed_batches`): 5 images in batches of
    at most 3 are two batches of 3, one program; the padding changes no value."""
    params, _, cfg = gaussian
    normal = pattern_images(5, seed=1)
    jitted = loss_scale._batch_gradient_and_weight
    jitted.clear_cache()
    one = loss_scale.measure(params, cfg, normal, 0.5, batch_size=3)
    assert jitted._cache_size() == 1
    each = [loss_scale._batch_gradient_and_weight(params, normal[i:i + 1], cfg) for i in range(5)]
    g = np.concatenate([np.asarray(a, np.float64) for a, _ in each])
    assert one.grad_rms == pytest.approx(float(np.sqrt(np.mean(np.square(g)))), rel=1e-5)


def test_settings_are_resolved_from_normal_images_only():
    """The resolution receives the model, the config (with its step and hold) and normal images: no
    labels, masks or test split can reach it."""
    names = set(inspect.signature(loss_scale.resolve).parameters)
    assert names == {"params", "config", "normal_x0_NxHxWxC", "batch_size"}
    assert set(inspect.signature(loss_scale.measure).parameters) == {"params", "config", "normal_x0_NxHxWxC", "hold",
                                                                     "batch_size"}


@pytest.mark.parametrize("kwargs, pattern", [(dict(step=0.0), "step"), (dict(hold=1.0), "hold"), (dict(hold=-0.1), "hold")])
def test_relative_settings_are_checked(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ProjectionConfig(**kwargs)


def test_the_projection_refuses_settings_left_to_resolve(gaussian):
    """A config with step / hold (the presets' kind) is resolved first; projecting it as it is would
    silently use the alpha and lam it carries for another model."""
    params, _, cfg = gaussian
    with pytest.raises(ValueError, match="loss_scale.resolve"):
        project_fn(params, pattern_images(1, seed=1), dataclasses.replace(cfg, step=1e-3))
    same, record = loss_scale.resolve(params, cfg, pattern_images(2, seed=1))
    assert same is cfg and record is None


def test_without_the_weighting_the_step_resolves_to_the_same_first_step(gaussian):
    """alpha = step / (rms g * mean w) with the weighting, step / rms g without: the typical normal
    pixel's first step is `step` either way (the ablation's alpha follows, not a constant)."""
    params, _, cfg = gaussian
    normal = pattern_images(4, seed=1)
    w, rec = loss_scale.resolve(params, dataclasses.replace(cfg, step=1e-3), normal)
    plain, _ = loss_scale.resolve(params, dataclasses.replace(cfg, step=1e-3, weighting=False), normal)
    assert plain.alpha == pytest.approx(w.alpha * rec["scale"]["weight_mean"], rel=1e-6)
