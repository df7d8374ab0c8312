"""Tests of iepjax.projection: the iterative energy-based projection (paper eq. 4).

Properties: one `lax.scan` of length T in the compiled program; vmap == loop over images;
T=0 returns x0; the energy falls at the preset's alpha/lam; jit == no-jit; one trace per shape;
the (x - f(x))^2 weighting is zero where the reconstruction is exact; x_T in [0, 1]; clear errors;
a checkpoint made with one implementation of the model's convolutions projects with the other.

The cheap property tests take the `conv` fixture and run under both implementations; those on
the module's shared calls (`calls`), the trained texture preset, early stopping and jit against
eager run the default one.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import nested_jaxprs, pattern_images
from iepjax import ProjectionConfig, project_fn, project_image, projection_step, reconstruct
from iepjax import projection
from iepjax import presets, sharding
from iepjax.config import split_traced


def _eqns(closed, name):
    return [e for j in nested_jaxprs(closed.jaxpr) for e in j.eqns if e.primitive.name == name]


@pytest.mark.parametrize("steps", [3, 7])
def test_program_is_one_scan_of_length_steps(params, model_cfg, steps, conv):
    cfg = ProjectionConfig(model=model_cfg, steps=steps)
    x = jnp.zeros((2, 32, 32, 1), jnp.float32)
    key, values = split_traced(cfg)
    closed = jax.make_jaxpr(functools.partial(projection._project_batch, config=key, values=values))(params, x)
    scans = _eqns(closed, "scan")
    assert len(scans) == 1, [e.primitive.name for e in scans]
    assert scans[0].params["length"] == steps
    assert not _eqns(closed, "while")  # no Python-unrolled or while-based step loop besides the scan
    # the per-step energies are the scan's stacked output: (B, T) at the end of the program
    out = jax.eval_shape(functools.partial(projection._project_batch, config=key, values=values), params, x)
    assert out.energies.shape == (2, steps)


def test_steps_zero_returns_x0_and_zero_maps(params, model_cfg, conv):
    x0 = pattern_images(2)
    res = project_fn(params, x0, ProjectionConfig(model=model_cfg, steps=0))
    np.testing.assert_array_equal(np.asarray(res.x_T), x0)
    np.testing.assert_array_equal(np.asarray(res.maps), np.zeros((2, 32, 32), np.float32))
    assert res.energies.shape == (2, 0)


# One config used only by `calls` below, so the compile counts are not disturbed by other tests.
_LOOP_CFG = dict(steps=3, alpha=0.5, lam=0.05, smoothing_sigma=1.0)


@pytest.fixture(scope="module")
def calls(trained, model_cfg):
    """project_fn on a batch of 3, on 3 new images of the same shape, and on each image alone,
    with the number of compiled programs of `_project_batch` after each."""
    params, _ = trained
    cfg = ProjectionConfig(model=model_cfg, **_LOOP_CFG)
    xa, xb = pattern_images(3, phase=0.5, seed=1), pattern_images(3, phase=2.0, seed=2)
    size = projection._project_batch._cache_size
    n0 = size()
    batched = jax.device_get(project_fn(params, xa, cfg))
    n1 = size()
    other = jax.device_get(project_fn(params, xb, cfg))
    n2 = size()
    singles = [jax.device_get(project_fn(params, xa[i:i + 1], cfg)) for i in range(3)]
    n3 = size()
    return dict(xa=xa, batched=batched, other=other, singles=singles, counts=(n0, n1, n2, n3))


def test_vmap_equals_loop_over_images(calls):
    b, singles = calls["batched"], calls["singles"]
    for field in ("x_T", "maps", "energies"):
        looped = np.concatenate([getattr(s, field) for s in singles])
        np.testing.assert_allclose(getattr(b, field), looped, atol=1e-5, rtol=1e-6, err_msg=field)
    assert np.abs(b.x_T - calls["xa"]).max() > 1e-3  # the images did move: the comparison is not trivial


def test_one_trace_per_shape(calls):
    n0, n1, n2, n3 = calls["counts"]
    assert n1 - n0 == 1, "first call compiles once"
    assert n2 - n1 == 0, "new arrays of the same shape must reuse the program"
    assert n3 - n2 == 1, "a new batch size compiles exactly once more"
    assert not np.allclose(calls["other"].x_T, calls["batched"].x_T)


def test_alpha_lam_and_stop_loss_are_traced_one_program_serves_every_value(trained, model_cfg):
    """Configs that differ only in alpha, lam or the value of stop_loss share one compiled program
    (`config.split_traced`), and each gives what a program with its values compiled in gives."""
    params, _ = trained
    x0 = pattern_images(2, phase=1.3, seed=9)
    cfgs = [ProjectionConfig(model=model_cfg, steps=4, alpha=a, lam=lam, stop_loss=stop)
            for a, lam, stop in ((0.5, 0.05, -1.0), (0.2, 0.5, -1.0), (0.5, 0.05, 1e9))]
    mesh = sharding.make_mesh(1)
    sharded = sharding._data_parallel_cached(projection.project_batch, mesh)
    n0, m0 = projection._project_batch._cache_size(), sharded._cache_size()
    for cfg in cfgs:
        got = jax.device_get(project_fn(params, x0, cfg))
        baked = jax.device_get(jax.jit(lambda p, x, cfg=cfg: jax.vmap(lambda xi: project_image(p, xi, cfg))(x))(params, x0))
        for field in ("x_T", "maps", "energies"):
            np.testing.assert_allclose(getattr(got, field), getattr(baked, field), rtol=1e-6, atol=1e-6, err_msg=field)
        np.testing.assert_allclose(sharding.project_sharded(params, x0, cfg, mesh).x_T, got.x_T, atol=1e-6)
    assert projection._project_batch._cache_size() - n0 == 1
    assert sharded._cache_size() - m0 == 1
    # the values are used: other alpha and lam move x elsewhere; a stop_loss above every image's
    # loss freezes it at x0, one below none (L_r > 0) lets it move
    first, other, frozen = (np.asarray(project_fn(params, x0, c).x_T) for c in cfgs)
    assert np.abs(first - other).max() > 1e-4 and np.abs(first - x0).max() > 1e-4
    np.testing.assert_array_equal(frozen, x0)
    without_stop = dataclasses.replace(cfgs[0], stop_loss=None)  # whether it stops is structure: a program of its own
    project_fn(params, x0, without_stop)
    assert projection._project_batch._cache_size() - n0 == 2


@pytest.fixture(scope="module")
def trained_preset(images_u8):
    """(params, model config) of a tiny model with the texture preset's likelihood and decoder,
    trained 40 steps on the suite's pattern images with the preset's learning rate."""
    from iepjax import training
    from iepjax.config import ModelConfig, TrainConfig

    pre = presets.train_config("textures", "brick")
    cfg = ModelConfig(size=images_u8.shape[1], channels=1, likelihood=pre.model.likelihood, decoder=pre.model.decoder)
    tcfg = TrainConfig(model=cfg, steps=40, batch_size=3, learning_rate=pre.learning_rate, augment=False)
    state = training.init_state(tcfg, key=jax.random.key(0))
    for step in range(tcfg.steps):
        idx = training.batch_indices(len(images_u8), tcfg.batch_size, tcfg.seed, step)
        state, _ = training.train_step(state, jnp.asarray(images_u8[idx]), tcfg)
    return state.params, cfg


def test_energy_falls_at_the_texture_preset(trained_preset):
    """With a briefly trained model of the preset's kind, E(x_t) decreases at every one of the first
    steps for each image, at the preset's alpha and lam.

    (At initial parameters it need not: f hardly depends on x, and the L1 term's subgradient makes
    x bounce around x0.)
    """
    params, model_cfg = trained_preset
    pre = presets.projection_config("textures", "brick")
    cfg = ProjectionConfig(model=model_cfg, steps=5, alpha=pre.alpha, lam=pre.lam, smoothing_sigma=pre.smoothing_sigma)
    e = np.asarray(project_fn(params, pattern_images(3, phase=0.5, seed=3), cfg).energies)
    assert e.shape == (3, 5)
    assert np.all(np.diff(e, axis=1) < 0), e
    # by a margin, not rounding: 1e-4 |E| is ~1000x float32's resolution at |E| ~ 200 (lam 15 holds
    # most of this small model's pixels at x0, so E falls by ~0.1 in 5 steps, by more than 1 at lam 10)
    assert e[:, -1].mean() < e[:, 0].mean() - 1e-4 * abs(e[:, 0].mean()), e


BIG_ALPHA = 2.0  # 100x the texture preset's


def test_backtracking_only_acts_when_the_energy_rises(trained_preset):
    """At the preset's alpha (E falls at every step) the safeguard changes nothing; at 100x that alpha
    the plain update runs away (E ends far above E(x0): measured +1000..+2200 from about -300), while
    with backtracking the accepted energy ends below E(x0) for every image."""
    params, model_cfg = trained_preset
    pre = presets.projection_config("textures", "brick")
    x0 = pattern_images(3, phase=0.5, seed=3)
    small = ProjectionConfig(model=model_cfg, steps=5, alpha=pre.alpha, lam=pre.lam)
    a, b = project_fn(params, x0, small), project_fn(params, x0, dataclasses.replace(small, backtrack=False))
    assert np.all(np.diff(np.asarray(a.energies), axis=1) < 0)  # no step is rejected: the safeguard is idle
    # Two compiled programs (the safeguard's selects are in one only): XLA may fuse them differently, so
    # their float32 sums may differ in the last bits. 1e-6 is far below one step's change (asserted).
    np.testing.assert_allclose(np.asarray(a.x_T), np.asarray(b.x_T), atol=1e-6, rtol=0)
    assert np.abs(np.asarray(a.x_T) - x0).max() > 100 * 1e-6
    # lam 10 for the run-away: at the preset's lam 15 the prior holds nearly every pixel of this small
    # model's third image at x0 (its loss pulls less than lam there), so it cannot run away
    big = dataclasses.replace(small, steps=20, alpha=BIG_ALPHA, lam=10.0)
    plain = project_fn(params, x0, dataclasses.replace(big, backtrack=False))
    safe = project_fn(params, x0, big)
    e_plain, e_safe = np.asarray(plain.energies), np.asarray(safe.energies)
    assert (e_plain[:, -1] > e_plain[:, 0]).all(), e_plain  # the plain update runs away
    accepted = np.minimum.accumulate(e_safe, axis=1)  # the running minimum is what the carry keeps
    assert np.all(accepted[:, -1] < e_safe[:, 0]), e_safe
    assert np.isfinite(np.asarray(safe.x_T)).all()
    assert np.abs(np.asarray(safe.x_T) - x0).mean() <= np.abs(np.asarray(plain.x_T) - x0).mean()


# x_T of two compiled programs that take the same steps on the same image (early stopping's selects are in
# one of them only) may differ by float rounding; one step moves the image by far more (asserted below).
SAME_STEPS_ATOL = 1e-6


def test_early_stop_freezes_an_image_at_the_first_step_its_loss_reaches_stop_loss(trained_preset):
    """An image stops at the first step t whose L_r(x_t) <= stop_loss: with the bar half-way between
    L_r(x_{k-1}) and L_r(x_k) of its own unstopped run (lam 0: E = L_r, falling at every step), x_T is
    the k-step projection, not the (k-1)- or (k+1)-step one. A stop_loss below every L_r changes
    nothing; one above L_r(x0) keeps x0 (zero map).

    Every run here has batch size 1, and the bar sits between two consecutive energies with a margin
    of half their gap (asserted to be >= 1e-4 |E|, ~1000x float32's resolution), so whether the bar is
    reached never depends on the last bits of a sum (those differ with the batch size, the machine
    and the XLA version).
    """
    params, model_cfg = trained_preset
    pre = presets.projection_config("textures", "brick")
    cfg = ProjectionConfig(model=model_cfg, steps=6, alpha=pre.alpha, lam=0.0, smoothing_sigma=0.0)
    x0 = pattern_images(3, phase=0.5, seed=3)
    k = 2
    for i in range(3):  # per image: each image has its own stopping step
        xi = x0[i:i + 1]
        free = project_fn(params, xi, cfg)
        e = np.asarray(free.energies)[0]
        assert np.all(np.diff(e) < 0), e
        gap = e[k - 1] - e[k]
        assert gap >= 1e-4 * abs(e[k]), e  # a margin far above float noise on either side of the bar
        stopped = project_fn(params, xi, dataclasses.replace(cfg, stop_loss=float(e[k] + 0.5 * gap)))
        x_T = np.asarray(stopped.x_T)
        steps = {n: np.asarray(project_fn(params, xi, dataclasses.replace(cfg, steps=n)).x_T) for n in (k - 1, k, k + 1)}
        np.testing.assert_allclose(x_T, steps[k], atol=SAME_STEPS_ATOL, rtol=0)
        # the check can fail: stopping a step early or late lands 100x the tolerance away
        for n in (k - 1, k + 1):
            assert np.abs(steps[n] - steps[k]).max() > 100 * SAME_STEPS_ATOL, n
        assert np.abs(x_T - np.asarray(free.x_T)).max() > 100 * SAME_STEPS_ATOL  # it did stop early
    free = project_fn(params, x0, cfg)
    e = np.asarray(free.energies)
    never = project_fn(params, x0, dataclasses.replace(cfg, stop_loss=float(e.min()) - 1e6))
    np.testing.assert_allclose(np.asarray(never.x_T), np.asarray(free.x_T), atol=SAME_STEPS_ATOL, rtol=0)
    # stopped at step 0, x_T is x0 itself (a select, no arithmetic): exact
    at_once = project_fn(params, x0, dataclasses.replace(cfg, stop_loss=float(e.max()) + 1.0, smoothing_sigma=1.0))
    np.testing.assert_array_equal(np.asarray(at_once.x_T), x0)
    np.testing.assert_array_equal(np.asarray(at_once.maps), np.zeros((3, 32, 32), np.float32))


def test_with_early_stop_takes_the_smallest_loss_of_the_normal_images(trained_preset, images_u8):
    from iepjax.early_stop import with_early_stop
    from iepjax.energy import energy
    params, model_cfg = trained_preset
    cfg = ProjectionConfig(model=model_cfg, steps=3)
    got = with_early_stop(params, cfg, images_u8[:4], batch_size=3)
    losses = [float(energy(params, jnp.asarray(im / 255.0, jnp.float32), jnp.asarray(im / 255.0, jnp.float32), cfg)[0])
              for im in images_u8[:4]]
    assert got.stop_loss == pytest.approx(min(losses), rel=1e-5)
    assert dataclasses.replace(got, stop_loss=None) == cfg
    with pytest.raises(ValueError, match="stop_loss"):
        ProjectionConfig(model=model_cfg, stop_loss=float("inf"))


def test_with_early_stop_refuses_a_model_with_non_finite_losses(trained_preset, images_u8):
    """A diverged model (NaN parameters) has no usable stopping loss: a clear error, not a config error."""
    from iepjax.early_stop import with_early_stop
    params, model_cfg = trained_preset
    bad = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
    with pytest.raises(FloatingPointError, match="not finite on 4 of 4 held-out normal images"):
        with_early_stop(bad, ProjectionConfig(model=model_cfg, steps=3), images_u8[:4])


def test_jit_equals_no_jit(trained, model_cfg):
    """The jitted projection equals the same maths run op by op (`jax.disable_jit`), with the suite's
    default convolutions. Not run per implementation: project_fn is always jitted, and the jitted
    implementations are checked equal (values and gradients, tests/method/test_model.py), so an eager
    run of the other one would test a path no caller takes (and compile each of its many ops alone)."""
    params, _ = trained
    cfg = ProjectionConfig(model=model_cfg, steps=2, alpha=0.5, lam=0.05, smoothing_sigma=1.0)
    x0 = pattern_images(1, phase=1.0, seed=4)
    jitted = jax.device_get(project_fn(params, x0, cfg))
    with jax.disable_jit():
        eager = jax.device_get(project_image(params, jnp.asarray(x0[0]), cfg))
    np.testing.assert_allclose(eager.x_T, jitted.x_T[0], atol=1e-5)
    np.testing.assert_allclose(eager.maps, jitted.maps[0], atol=1e-5)
    np.testing.assert_allclose(eager.energies, jitted.energies[0], rtol=1e-5)
    assert np.abs(jitted.x_T[0] - x0[0]).max() > 1e-3


@pytest.fixture(scope="module")
def step_fn():
    return jax.jit(projection_step, static_argnames="config")


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_weighting_is_zero_where_reconstruction_is_exact(constant_params, model_cfg, step_fn, fraction):
    """With f(x) = 0.3 for every x, pixels where x == 0.3 == f(x) must not move with the weighting,
    but do move with a plain gradient step (the ablation); the other pixels move in both."""
    params = constant_params(0.3)
    cfg = ProjectionConfig(model=model_cfg, steps=1, alpha=0.5, lam=0.05, weighting=True)
    rng = np.random.default_rng(5)
    x = rng.uniform(0.5, 0.9, (32, 32, 1)).astype(np.float32)
    f = np.asarray(reconstruct(params, jnp.asarray(x), cfg))
    assert np.all(f == f.flat[0]) and f.flat[0] == pytest.approx(0.3)  # f is constant: exact fixed points exist
    exact = rng.random(x.shape) < fraction
    x = np.where(exact, f, x)
    np.testing.assert_array_equal(np.asarray(reconstruct(params, jnp.asarray(x), cfg))[exact], x[exact])

    x1, _ = step_fn(params, jnp.asarray(x), jnp.asarray(x), cfg)
    x1 = np.asarray(x1)
    np.testing.assert_array_equal(x1[exact], x[exact])
    if fraction < 1:
        assert np.mean(x1[~exact] != x[~exact]) > 0.9

    x1_plain, _ = step_fn(params, jnp.asarray(x), jnp.asarray(x), dataclasses.replace(cfg, weighting=False))
    x1_plain = np.asarray(x1_plain)
    assert np.mean(x1_plain[exact] != x[exact]) > 0.9


def test_x_T_stays_in_unit_interval(trained, model_cfg):
    params, _ = trained
    cfg = ProjectionConfig(model=model_cfg, steps=2, alpha=1e4, lam=0.05, smoothing_sigma=0.0)
    x0 = np.random.default_rng(6).uniform(0.2, 0.8, (2, 32, 32, 1)).astype(np.float32)
    x_T = np.asarray(project_fn(params, x0, cfg).x_T)
    assert x_T.min() >= 0.0 and x_T.max() <= 1.0
    assert np.mean((x_T == 0.0) | (x_T == 1.0)) > 0.01  # the huge step did hit the bounds: clipping is exercised


@pytest.mark.parametrize("make,exc,pattern", [
    (lambda: np.zeros((2, 32, 32, 3), np.float32), ValueError, r"3 channel.*trained on 1"),
    (lambda: np.zeros((2, 48, 48, 1), np.float32), ValueError, r"48x48.*32x32.*resize"),
    (lambda: np.zeros((2, 32, 32, 1), np.uint8), TypeError, r"uint8.*255"),
    (lambda: np.zeros((32, 32, 1), np.float32), ValueError, r"batch axis.*x\[None\]"),
    (lambda: [[0.0]], ValueError, r"\(B, 32, 32, 1\)"),
], ids=["channels", "size", "uint8", "no-batch-axis", "not-an-array"])
def test_clear_errors(params, model_cfg, make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        project_fn(params, make(), ProjectionConfig(model=model_cfg, steps=1))


def test_projection_defaults_follow_the_likelihood(tmp_path):
    """alpha and lam scale with the model's loss: the texture preset's (calibrated for its Gaussian
    likelihood) for a Gaussian model, the ports' BCE values for a `--likelihood bce` run; project.py
    reads the likelihood from the run's config.json."""
    from iepjax import runs
    from iepjax.presets import LIKELIHOOD_PROJECTION

    assert presets.train_config("textures", "brick").model.likelihood == "gaussian"
    gauss = presets.projection_config("textures", "brick", "gaussian")
    bce = presets.projection_config("textures", "brick", "bce")
    assert (gauss.alpha, gauss.lam) == (0.02, 15.0)  # what step and hold resolve to on the brick model
    assert (gauss.step, gauss.hold) == (1.07e-3, 0.37) and bce.resolved  # the ports' BCE values as such
    assert (bce.alpha, bce.lam) == (LIKELIHOOD_PROJECTION["bce"]["alpha"], LIKELIHOOD_PROJECTION["bce"]["lam"])
    assert bce.steps == gauss.steps and bce.smoothing_sigma == gauss.smoothing_sigma
    assert presets.projection_config("textures", "brick", None) == gauss
    (tmp_path / "config.json").write_text('{"model": {"likelihood": "bce", "size": 64}}')
    assert runs.model_config(tmp_path)["likelihood"] == "bce"
    assert runs.model_config(tmp_path / "missing") == {}


def test_the_map_smoothing_keeps_its_share_of_the_model_input():
    """smoothing_sigma is stated at the preset's model size (1 px at 64 px, 2 px at 128 px) and scales
    with the run's size: an own folder trained with --size 64 is smoothed as the built-in textures are."""
    assert presets.projection_config("textures", "brick").smoothing_sigma == 1.0
    assert presets.projection_config("textures", "brick", size=64).smoothing_sigma == 1.0
    assert presets.projection_config("textures", "brick", "bce", size=32).smoothing_sigma == 0.5
    assert presets.projection_config("mvtec_ad", "carpet", size=128).smoothing_sigma == 2.0
    assert presets.projection_config("folder", "moon").smoothing_sigma == 2.0  # the object row: 128 px
    assert presets.projection_config("folder", "moon", size=64).smoothing_sigma == 1.0
    assert presets.projection_config("folder", "carpet", size=256).smoothing_sigma == 4.0


def _maps_by_conv(params, cfg, x0):
    return {conv: jax.device_get(project_fn(params, x0, cfg, conv=conv)) for conv in ("xla_cpu", "plain")}


def _assert_same_projection(results):
    a, b = results["xla_cpu"], results["plain"]
    np.testing.assert_allclose(b.maps, a.maps, atol=1e-4, rtol=0)
    np.testing.assert_allclose(b.x_T, a.x_T, atol=1e-4, rtol=0)
    np.testing.assert_allclose(b.energies, a.energies, rtol=1e-5)
    assert a.maps.max() > 1e-2  # the images did move: the comparison is not trivial


def test_a_checkpoint_made_with_one_implementation_projects_with_the_other(tmp_path, trained, model_cfg, images_u8):
    """A run trained with the plain convolutions saves the same checkpoint (config included: the
    implementation is not recorded) and projects with the XLA:CPU ones to the same maps; the suite's
    model, trained with the default (XLA:CPU on CPU), projects with the plain ones to the same maps.
    `project_fn(conv=...)` compiles once per implementation and reuses the programs."""
    from iepjax import checkpointing, training
    from iepjax.config import TrainConfig, to_dict
    from iepjax.model import using_conv

    tcfg = TrainConfig(model=model_cfg, steps=2, batch_size=3, augment=False, checkpoint_every=2, log_every=2)
    with using_conv("plain"):
        training.train(tcfg, images_u8, tmp_path, progress=False)
    saved = checkpointing.restore_config(tmp_path / "checkpoints")
    assert saved["model"] == to_dict(model_cfg)
    loaded, loaded_cfg = training.load_params(tmp_path)
    assert loaded_cfg.model == model_cfg

    cfg = ProjectionConfig(model=model_cfg, steps=3, alpha=0.5, lam=0.05, smoothing_sigma=1.0)
    x0 = pattern_images(2, phase=0.7, seed=7)
    n0 = projection._project_batch._cache_size()
    results = _maps_by_conv(loaded, cfg, x0)
    assert projection._project_batch._cache_size() - n0 == 2  # one program per implementation
    again = jax.device_get(project_fn(loaded, x0, cfg, conv="plain"))
    assert projection._project_batch._cache_size() - n0 == 2  # reused, not retraced
    np.testing.assert_array_equal(again.maps, results["plain"].maps)
    _assert_same_projection(results)
    _assert_same_projection(_maps_by_conv(trained[0], cfg, x0))
