"""Reliability: models that move between machines, runs that never share a folder, outputs that are
complete or absent, and clear errors before long work.

Several checks need fresh processes (a device count is fixed when JAX starts; a lock or a kill
concerns a whole process): this file is also their worker, `python tests/test_reliability.py
<mode> ...` (see `_worker` at the end).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
TIMEOUT = 300


def _env(devices: int | None = None, **extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", **extra)
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_NUM_CPU_DEVICES", None)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _worker_run(*args: str, devices: int | None = None, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, env=_env(devices), capture_output=True,
                          text=True, timeout=TIMEOUT, **kw)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


# --------------------------------------------------------------------------- checkpoints move between machines


@pytest.fixture(scope="module")
def two_device_run(tmp_path_factory):
    """A run folder trained (2 steps, data-parallel) by a process with 2 CPU devices."""
    run = tmp_path_factory.mktemp("portable") / "run"
    _worker_run("train", str(run), devices=2)
    return run


def test_checkpoint_from_2_devices_loads_and_projects_on_1_and_on_4(two_device_run, tmp_path):
    """A model trained with its state replicated over 2 devices restores in a plain process (1 CPU
    device, no `use_cpu_cores`) and in one with 4 devices, and gives the same maps.

    Before, orbax restored each array onto the topology it was saved from: `load_params` failed with
    "Topology mismatch detected" on any other device count.
    """
    outs = {}
    for devices in (1, 4):
        out = tmp_path / f"d{devices}.npz"
        _worker_run("project", str(two_device_run), str(out), devices=None if devices == 1 else devices)
        with np.load(out) as z:
            outs[devices] = {k: z[k] for k in z.files}
    one, four = outs[1], outs[4]
    assert int(one["device_count"]) == 1 and int(four["device_count"]) == 4
    # restoring copies the stored bytes: the parameters are bit-identical whatever the device count
    assert one["params"].size > 1000 and np.array_equal(one["params"], four["params"])
    # the same program on the same inputs (project_fn on one device) gives the same maps
    np.testing.assert_array_equal(one["maps"], four["maps_single"])
    # split over 4 devices the program differs (XLA partitions the batch), so the maps may differ by
    # float32 rounding: the bound of tests/test_sharding.py for the same projection (<= 1e-5), on maps
    # of size ~1e-2 here
    assert np.abs(one["maps"]).max() > 5e-3
    assert np.abs(one["maps"] - four["maps_sharded"]).max() <= 1e-5
    # the 4-device process resumed the 2-device training for one more step on its own mesh
    assert int(four["resumed_step"]) == 3
    # where the run was trained is recorded (informational only)
    trained = json.loads(str(one["trained_on"]))
    assert trained["devices"] == 2 and trained["backend"] == "cpu" and trained["jax"]


def _train_worker(run: str) -> None:
    import jax

    from iepjax import ModelConfig, TrainConfig, sharding, training
    assert jax.device_count() == 2
    cfg = TrainConfig(model=ModelConfig(size=SIZE, channels=1, latent=4), steps=2, batch_size=2, augment=False,
                      checkpoint_every=2, log_every=1)
    images = np.random.default_rng(0).integers(0, 256, (6, SIZE, SIZE, 1), dtype=np.uint8)
    training.train(cfg, images, run, progress=False, mesh=sharding.make_mesh(divides=cfg.batch_size))


def _project_worker(run: str, out: str) -> None:
    import dataclasses

    import jax

    from iepjax import ProjectionConfig, checkpointing, project_fn, sharding, training
    params, tcfg = training.load_params(run)  # no use_cpu_cores: a plain process
    # plain gradient steps without the prior: every pixel moves, maps of ~1e-2 after 2 steps
    cfg = ProjectionConfig(model=tcfg.model, steps=2, alpha=0.05, lam=0.0, weighting=False, smoothing_sigma=1.0)
    x = np.random.default_rng(1).random((4, SIZE, SIZE, 1)).astype(np.float32)
    res = {"device_count": jax.device_count(), "maps": np.asarray(project_fn(params, x, cfg).maps),
           "params": np.concatenate([np.asarray(a).ravel() for a in jax.tree.leaves(params)]),
           "trained_on": json.dumps(checkpointing.trained_on(Path(run) / "checkpoints"))}
    if jax.device_count() > 1:
        mesh = sharding.make_mesh()
        res["maps_single"] = res["maps"]
        res["maps_sharded"] = sharding.project_sharded(params, x, cfg, mesh).maps
        images = np.random.default_rng(0).integers(0, 256, (6, SIZE, SIZE, 1), dtype=np.uint8)
        summary = training.train(dataclasses.replace(tcfg, steps=3, batch_size=4), images, run, progress=False,
                                 mesh=mesh)
        res["resumed_step"] = int(summary.state.step)
    np.savez(out, **res)


# --------------------------------------------------------------------------- strict JSON, atomic files


def test_strict_json_writes_null_for_nan():
    from iepjax import atomic
    text = atomic.dumps_json({"a": float("nan"), "b": [np.float32(np.inf), 1.5, np.float64(2.0)], "c": np.int64(3)})
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [None, 1.5, 2.0], "c": 3}


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    from iepjax import atomic
    path = tmp_path / "sub" / "x.json"
    atomic.write_json(path, {"v": 1})
    atomic.write_text(path, "second")
    assert path.read_text() == "second" and sorted(p.name for p in path.parent.iterdir()) == ["x.json"]
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_output_folder_with_a_fixed_name(tmp_path):
    from iepjax import atomic
    final = tmp_path / "out"
    with atomic.output_folder(final) as out:
        (out.path / "scores.csv").write_text("file\n")
        assert not final.exists()
    assert (final / "scores.csv").exists() and not (final / atomic.LOCK_NAME).exists()
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        with atomic.output_folder(final):
            pass
    with atomic.output_folder(final, replace=True) as out:
        (out.path / "new.txt").write_text("n")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]


# --------------------------------------------------------------------------- worker entry point


def _worker(argv: list[str]) -> None:
    mode, *args = argv
    {"train": _train_worker,
     "project": _project_worker}[mode](*args)


if __name__ == "__main__":
    _worker(sys.argv[1:])
