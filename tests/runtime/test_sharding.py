"""Sharded projection and data-parallel training equal the single-device ones.

XLA_FLAGS=--xla_force_host_platform_device_count must be set before jax is imported, so the
multi-device side runs this file as a worker in a fresh subprocess (`python tests/runtime/test_sharding.py
--worker N`), which computes both versions and prints their differences as JSON.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SIZE, N_IMAGES, BATCH = 32, 7, 3  # 7 images in batches of 3: neither is a multiple of 8


def _run_worker(devices: int, *extra: str) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, "--worker", str(devices), *extra], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def eight():
    """One 8-device process for both checks (a process per device count would cost an interpreter and
    its compilations each): more devices than a batch of 3 images, 5 images split unevenly, and a
    training batch of 8 split one image per device. tests/pipeline/test_reliability.py runs 2 and 4."""
    return _run_worker(8, "--train")


def test_projection_on_8_devices_equals_one_device(eight):
    _check_projection(eight, 8)


def _check_projection(out: dict, devices: int) -> None:
    assert out["devices"] == devices and out["mesh"] == devices
    for name, d in out["localize_diff"].items():  # maps, recon maps, x_T, f(x0): float32 rounding
        assert d <= 1e-5, (name, d)
    assert out["energies_rel_diff"] <= 1e-5
    assert out["shapes_equal"]
    # maps equal to float32 rounding (<= 1e-5) move a pixel across a threshold now and then: the
    # rank metrics then differ by a few 1e-6 (seen: AU-PRO 2.5e-6 on 8 devices)
    for row in ("grad", "recon"):
        for k, v in out["metrics_1"][row].items():
            assert out["metrics_n"][row][k] == pytest.approx(v, abs=5e-5), (row, k)
    assert out["project_sharded_diff"] <= 1e-5  # B=5 not a multiple of the device count


def test_training_on_8_devices_equals_one_device(eight):
    t = eight["train"]
    assert t["steps"] == [3, 3]
    # Adam's first steps move each weight by about lr * sign(gradient): where a gradient is ~0, its
    # rounding can flip that sign, so a handful of weights may differ by up to 2 lr per step
    assert t["param_frac_over_1e-6"] <= 1e-4, t
    assert t["param_max_abs_diff"] <= 2 * 2e-4 * 3, t
    assert t["loss_rel_diff"] <= 1e-4, t


def test_mesh_helpers_in_one_process():
    """make_mesh gives a mesh of one on one device (one code path for any device count); padding helper."""
    from iepjax import sharding
    mesh = sharding.make_mesh()
    assert mesh.size == 1 and sharding.local_size(mesh) == 1 and mesh == sharding.make_mesh(1)
    with pytest.raises(ValueError, match="--devices"):
        sharding.make_mesh(2)
    x, real = sharding.pad_to(np.arange(5)[:, None], 4)
    assert real == 5 and x.shape == (8, 1) and (x[5:] == 4).all()
    for n, batch_size, sizes in ((40, 32, [20, 20]), (65, 64, [33, 33]), (5, 32, [5]), (7, 3, [3, 3, 3]), (0, 4, [])):
        got = list(sharding.fixed_batches(np.arange(n), batch_size))  # equal batches: one compiled shape
        assert [len(b) for b, _ in got] == sizes and sum(r for _, r in got) == n
        assert np.concatenate([b[:r] for b, r in got] or [np.arange(0)]).tolist() == list(range(n))
    from iepjax import distributed
    rows, real = distributed.process_rows(5)
    assert real == 5 and rows.tolist() == [0, 1, 2, 3, 4]
    assert distributed.initialize() is False  # nothing asked for: one process, nothing done


def test_a_mesh_of_one_computes_what_plain_jit_does(params, model_cfg, images_u8):
    """One device is a mesh of one: the projection and the training step over it equal, bit for bit,
    the plain jitted `project_fn` and `train_step` (so the library keeps a single code path)."""
    import jax
    import jax.numpy as jnp

    from iepjax import ProjectionConfig, TrainConfig, project_fn, sharding, training_step
    mesh = sharding.make_mesh(1)
    cfg = ProjectionConfig(model=model_cfg, steps=3, alpha=0.5, lam=0.05)
    x = images_u8[:3].astype(np.float32) / 255.0
    plain, meshed = jax.device_get(project_fn(params, x, cfg)), sharding.project_sharded(params, x, cfg, mesh)
    for a, b in zip(plain, meshed):
        np.testing.assert_array_equal(a, b)
    tcfg = TrainConfig(model=model_cfg, steps=2, batch_size=3, augment=False)
    s0 = training_step.init_state(tcfg, key=jax.random.key(0))
    one, step, put = sharding.training_on(mesh, s0)
    for k in range(2):
        idx = training_step.batch_indices(len(images_u8), 3, tcfg.seed, k)
        s0, _ = training_step.train_step(s0, jnp.asarray(images_u8[idx]), tcfg)
        one, _ = step(one, put(images_u8[idx]), tcfg)
    for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(sharding.local_rows(one))):
        np.testing.assert_array_equal(np.asarray(a), b)


# ------------------------------------------------------------------------------------ worker


def _worker(devices: int, train: bool) -> dict:
    import tempfile

    import jax

    from iepjax import ModelConfig, ProjectionConfig, TrainConfig, init_params, project_fn, sharding
    from iepjax import training
    from iepjax.localization import localize
    from iepjax.scoring import score

    assert jax.device_count() == devices
    model = ModelConfig(size=SIZE, channels=1, latent=4)
    cfg = ProjectionConfig(model=model, steps=2, smoothing_sigma=1.0)
    params = init_params(model, key=jax.random.key(0))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N_IMAGES, SIZE, SIZE, 1), dtype=np.uint8)
    masks = np.zeros((N_IMAGES, SIZE, SIZE), bool)
    masks[4:, 8:16, 8:16] = True
    labels = (np.arange(N_IMAGES) >= 4).astype(np.int64)
    mesh = sharding.make_mesh()
    one = localize(params, images, cfg, batch_size=BATCH, progress=False, mesh=sharding.make_mesh(1))
    many = localize(params, images, cfg, batch_size=BATCH, progress=False, mesh=mesh)
    fields = ("grad_maps", "recon_maps", "x_T", "recon")
    out = {
        "devices": jax.device_count(), "mesh": int(mesh.size),
        "shapes_equal": all(getattr(one, f).shape == getattr(many, f).shape for f in fields + ("energies",)),
        "localize_diff": {f: float(np.abs(getattr(one, f) - getattr(many, f)).max()) for f in fields},
        "energies_rel_diff": float(np.abs(one.energies - many.energies).max() / np.abs(one.energies).max()),
        "metrics_1": {"grad": score(one.grad_maps, masks, labels), "recon": score(one.recon_maps, masks, labels)},
        "metrics_n": {"grad": score(many.grad_maps, masks, labels), "recon": score(many.recon_maps, masks, labels)},
    }
    x5 = images[:5].astype(np.float32) / 255.0
    ref = project_fn(params, x5, cfg).maps
    out["project_sharded_diff"] = float(np.abs(np.asarray(ref) - sharding.project_sharded(params, x5, cfg, mesh).maps).max())
    if train:
        tcfg = TrainConfig(model=model, steps=3, batch_size=8, seed=3, checkpoint_every=100, log_every=1)
        timages = rng.integers(0, 256, (12, SIZE, SIZE, 1), dtype=np.uint8)
        with tempfile.TemporaryDirectory() as d:
            s1 = training.train(tcfg, timages, Path(d) / "one", progress=False, mesh=sharding.make_mesh(1))
            s4 = training.train(tcfg, timages, Path(d) / "four", progress=False, mesh=mesh)
            log1 = (Path(d) / "one" / "train_log.csv").read_text().splitlines()
            log4 = (Path(d) / "four" / "train_log.csv").read_text().splitlines()
        diffs = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel() for a, b in
                                zip(jax.tree.leaves(s1.state.params), jax.tree.leaves(s4.state.params))])
        loss1 = np.array([float(r.split(",")[1]) for r in log1[1:]])
        loss4 = np.array([float(r.split(",")[1]) for r in log4[1:]])
        out["train"] = {"steps": [int(s1.state.step), int(s4.state.step)],
                        "param_max_abs_diff": float(diffs.max()),
                        "param_frac_over_1e-6": float(np.mean(diffs > 1e-6)),
                        "loss_rel_diff": float(np.abs(loss1 - loss4).max() / np.abs(loss1).max())}
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        print(json.dumps(_worker(int(sys.argv[2]), "--train" in sys.argv)))

