"""Projection throughput with the batch split over 1, 2 and 4 devices; one JSON line each.

    python benchmarks/sharding.py                       # CPU, fake devices: 1, 2, 4
    python benchmarks/sharding.py --devices 1 2 4 8 --size 128 --steps 20 --batch 16

Each device count runs in its own subprocess, because the number of CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N) must be set before JAX is imported.
On a real multi-accelerator machine pass --platform gpu (or tpu): the device count is then a
limit on the visible devices (`iepjax.sharding.make_mesh(n)`), no flag is set.
CPU devices share the machine's cores: up to one device per core they put more cores to work
(XLA:CPU runs each convolution on one core); beyond that they only show the cost of the sharded
program.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import positive_int

ROOT = Path(__file__).resolve().parents[1]


def measure(devices: int, size: int, steps: int, batch: int, repeats: int) -> dict:
    """Time `repeats` projections of one batch, after one call that compiles."""
    import jax
    import numpy as np

    from iepjax import ModelConfig, ProjectionConfig, init_params, sharding

    model = ModelConfig(size=size, channels=1)
    config = ProjectionConfig(model=model, steps=steps)
    params = init_params(model, key=jax.random.key(0))
    x = np.random.default_rng(0).random((batch, size, size, 1), np.float32)
    mesh = sharding.make_mesh(devices)
    params = sharding.replicate(params, mesh)
    run = lambda: sharding.project_sharded(params, x, config, mesh)  # noqa: E731 (numpy out: synchronous)
    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        run()
    dt = (time.perf_counter() - t0) / repeats
    return {"devices": int(mesh.size), "platform": jax.devices()[0].platform,
            "cores": os.cpu_count(), "size": size, "steps": steps, "batch": batch, "repeats": repeats,
            "compile_s": round(compile_s, 3), "batch_s": round(dt, 4), "img_per_s": round(batch / dt, 3),
            "img_steps_per_s": round(batch * steps / dt, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=positive_int, nargs="+", default=[1, 2, 4])
    p.add_argument("--size", type=positive_int, default=64)
    p.add_argument("--steps", type=positive_int, default=10)
    p.add_argument("--batch", type=positive_int, default=8, help="images per call (padded to a multiple of the devices)")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--platform", default="cpu", help="cpu: fake devices via XLA_FLAGS; gpu/tpu: real ones")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker is not None:
        print(json.dumps(measure(a.worker, a.size, a.steps, a.batch, a.repeats)), flush=True)
        return 0
    for n in a.devices:
        env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS=a.platform)
        if a.platform == "cpu":
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
        cmd = [sys.executable, __file__, "--worker", str(n), "--size", str(a.size), "--steps", str(a.steps),
               "--batch", str(a.batch), "--repeats", str(a.repeats)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            print(json.dumps({"devices": n, "error": proc.stderr.strip().splitlines()[-1:]}), flush=True)
            continue
        print(proc.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
