"""Two processes with jax.distributed on 127.0.0.1 give the single-process maps and metrics.

The test starts this file twice as a worker (`python tests/runtime/test_distributed.py --worker ID PORT OUT`):
each process joins the group, projects its half of a small data set (`localization.localize` with
a mesh over both processes' CPU devices), gets every process's maps back, and process 0 writes
metrics.json and maps.npz. The same localisation in this (single) process is the reference.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SIZE, N_IMAGES, BATCH, TIMEOUT_S = 32, 7, 2, 100


def _data():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (N_IMAGES, SIZE, SIZE, 1), dtype=np.uint8)
    masks = np.zeros((N_IMAGES, SIZE, SIZE), bool)
    masks[4:, 8:16, 10:20] = True
    labels = (np.arange(N_IMAGES) >= 4).astype(np.int64)
    return images, masks, labels


def _setup():
    import jax

    from iepjax import ModelConfig, ProjectionConfig, init_params
    model = ModelConfig(size=SIZE, channels=1, latent=4)
    return init_params(model, key=jax.random.key(0)), ProjectionConfig(model=model, steps=2, smoothing_sigma=1.0)


def _metrics(loc, masks, labels) -> dict:
    from iepjax.scoring import score
    return {"grad": score(loc.grad_maps, masks, labels), "recon": score(loc.recon_maps, masks, labels)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    logs = [open(tmp_path / f"p{i}.log", "w") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(i), str(port), str(tmp_path)],
                              cwd=ROOT, env=env, stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pytest.fail(f"workers did not finish in {TIMEOUT_S} s:\n" + _tails(tmp_path))
    finally:
        for p in procs:  # kill whatever is left, then reap it
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    assert [p.returncode for p in procs] == [0, 0], _tails(tmp_path)

    from iepjax.localization import localize
    images, masks, labels = _data()
    params, config = _setup()
    ref = localize(params, images, config, batch_size=BATCH, progress=False)
    got = json.loads((tmp_path / "metrics.json").read_text())
    assert got["process_count"] == 2 and got["devices"] == 2
    assert got["shares"] == [[0, 1, 2, 3], [4, 5, 6]]
    maps = np.load(tmp_path / "maps.npz")
    np.testing.assert_allclose(maps["grad"], ref.grad_maps, atol=1e-5)
    np.testing.assert_allclose(maps["recon"], ref.recon_maps, atol=1e-5)
    want = _metrics(ref, masks, labels)
    for row in ("grad", "recon"):
        for k, v in want[row].items():
            assert got["metrics"][row][k] == pytest.approx(v, abs=5e-5), (row, k)  # maps equal to 1e-5: rank metrics to a few 1e-6


def _tails(folder: Path) -> str:
    return "\n".join(f"--- p{i}\n" + (folder / f"p{i}.log").read_text()[-3000:] for i in range(2))


# ------------------------------------------------------------------------------------ worker


def _worker(process_id: int, port: int, out: Path) -> None:
    from iepjax import distributed
    assert distributed.initialize(f"127.0.0.1:{port}", 2, process_id)

    import jax

    from iepjax import sharding
    from iepjax.localization import localize
    images, masks, labels = _data()
    params, config = _setup()
    mesh = sharding.make_mesh()
    loc = localize(params, images, config, batch_size=BATCH, progress=False, mesh=mesh)
    rows, real = distributed.process_rows(len(images))
    from jax.experimental import multihost_utils
    shares = multihost_utils.process_allgather(np.concatenate([rows[:real], np.full(len(rows) - real, -1)]))
    if distributed.is_main():
        (out / "metrics.json").write_text(json.dumps({
            "process_count": jax.process_count(), "devices": int(mesh.size),
            "shares": [[int(i) for i in s if i >= 0] for s in np.asarray(shares)],
            "metrics": _metrics(loc, masks, labels)}))
        np.savez(out / "maps.npz", grad=loc.grad_maps, recon=loc.recon_maps)
    jax.distributed.shutdown()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
