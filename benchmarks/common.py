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
DEFAULT_REFERENCE = ROOT / "benchmarks" / "torch_reference.py"
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
    """`benchmarks/torch_reference.py` (or `path`) imported as a module (needs torch)."""
    return load_module(path, "torch_reference")


# The implementations of the model's convolutions (`iepjax.model.CONV_CHOICES`, checked by a test),
# spelled out here because these scripts also run under a PyTorch-only interpreter.
CONVS = ("auto", "plain", "xla_cpu")
CONV_HELP = ("the model's convolutions: plain (flax/lax), xla_cpu (the XLA:CPU formulation, "
             "iepjax/xla_cpu_convs.py) or auto (xla_cpu on CPU, plain elsewhere)")


def use_conv(conv: str) -> str:
    """Make `conv` the process's convolution implementation (`iepjax.model.set_default_conv`) before
    anything is traced; return the implementation it resolves to here ("plain" or "xla_cpu")."""
    from iepjax import model
    model.set_default_conv(conv)
    return model.resolve_conv()


def record_convs(fn, *args, batch: int, conv: str = "xla_cpu") -> list[tuple]:
    """(x shape, w shape, strides, padding, lhs_dilation) of every convolution of the model while
    `fn(*args)` is traced (nothing runs) with the implementation `conv`, in the order they are made.

    "xla_cpu": every `iepjax.xla_cpu_convs.conv` call (before its formulation splits it into phases
    or matmuls). "plain": every forward `conv_general_dilated` of the traced program (canonical
    NHWC/HWIO layout; the gradients' convolutions, in other layouts, are left out). x's leading
    axis is reported as `batch`: under vmap the per-image code sees a batch of 1.
    """
    import jax

    from iepjax import model, xla_cpu_convs
    if model.resolve_conv(conv) == "plain":
        return [((batch,) + c[0][1:],) + c[1:] for c in _forward_lax_convs(fn, *args)]
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


def _forward_lax_convs(fn, *args) -> list[tuple]:
    """The NHWC/HWIO `conv_general_dilated` equations of fn's plain-model jaxpr, nested ones included."""
    import jax
    from jax import lax
    from jax.extend import core as jcore

    from iepjax import model
    nhwc = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), ("NHWC", "HWIO", "NHWC"))

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            p = eqn.params
            if (eqn.primitive.name == "conv_general_dilated" and p["dimension_numbers"] == nhwc
                    and p["feature_group_count"] == 1 and all(d == 1 for d in p["rhs_dilation"])):
                yield (tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape), tuple(p["window_strides"]),
                       tuple(tuple(pp) for pp in p["padding"]), tuple(p["lhs_dilation"]))
            for value in p.values():
                for item in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(item, jcore.ClosedJaxpr):
                        yield from walk(item.jaxpr)
                    elif isinstance(item, jcore.Jaxpr):
                        yield from walk(item)

    with model.using_conv("plain"):
        return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def conv_fn(conv: str):
    """The function (x, w, strides, padding, lhs_dilation) -> y that computes one recorded convolution
    with the implementation `conv`: `xla_cpu_convs.conv` (custom VJP) or the plain lax convolution."""
    from iepjax import model, xla_cpu_convs
    return xla_cpu_convs.conv if model.resolve_conv(conv) == "xla_cpu" else xla_cpu_convs.lax_conv


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
