"""What the benchmark scripts share: paths, PyTorch thread settings, subprocess environment.

The scripts run their sides in fresh subprocesses (JAX device counts and PyTorch threading are
fixed at process start); `env` gives those subprocesses this checkout on PYTHONPATH.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = ROOT.parent / "shared" / "bench" / "torch_reference.py"
# PyTorch thread settings the reference runs under; ratios are taken against the fastest one
TORCH_ENVS = {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "1thread": {"OMP_NUM_THREADS": "1"}}


def env(extra: dict | None = None) -> dict:
    """os.environ with this checkout first on PYTHONPATH, plus `extra`."""
    out = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out.update(extra or {})
    return out


def imports_torch(python: str | Path) -> bool:
    """Whether the interpreter `python` exists and can import torch."""
    try:
        return subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode == 0
    except OSError:  # no such interpreter, or not executable
        return False


def load_module(path: str | Path, name: str):
    """The Python file at `path` imported as module `name`, without importing the package it sits in."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_torch_reference(path: str | Path):
    """`../shared/bench/torch_reference.py` (or `path`) imported as a module (needs torch)."""
    return load_module(path, "torch_reference")


def record_convs(fn, *args, batch: int) -> list[tuple]:
    """(x shape, w shape, strides, padding, lhs_dilation) of every `iepjax.xla_cpu_convs.conv` call made
    while `fn(*args)` is traced (`jax.eval_shape`, nothing runs) with the XLA:CPU formulation of the
    model's convolutions. x's leading axis is reported as `batch`: under vmap the per-image code sees a
    batch of 1."""
    import jax

    from iepjax import model, xla_cpu_convs
    calls, raw = [], xla_cpu_convs.conv

    def recording(x, w, strides, padding, lhs_dilation):
        calls.append(((batch,) + tuple(x.shape[1:]), tuple(w.shape), strides, padding, lhs_dilation))
        return raw(x, w, strides, padding, lhs_dilation)

    xla_cpu_convs.conv = recording
    try:
        with model.using_conv("xla_cpu"):
            jax.eval_shape(fn, *args)
    finally:
        xla_cpu_convs.conv = raw
    return calls


def median_seconds(f, *args, repeats: int) -> float:
    """Median wall time of `repeats` calls of the jitted `f(*args)`, after one untimed call (compile)."""
    import statistics
    import time

    import jax
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# argparse type for counts (--steps, --rounds, --batch, ...). Loaded by path: these scripts also
# run under a PyTorch-only interpreter, where importing the iepjax package (jax) fails.
positive_int = load_module(ROOT / "iepjax" / "cli.py", "iepjax_cli").positive_int
