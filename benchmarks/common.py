"""What the benchmark scripts share: paths, PyTorch thread settings, subprocess environment.

The scripts run their sides in fresh subprocesses (JAX device counts and PyTorch threading are
fixed at process start); `env` gives those subprocesses this checkout on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = ROOT.parent / "shared" / "bench" / "torch_reference.py"
# PyTorch thread settings the reference runs under; ratios are taken against the fastest one
TORCH_ENVS = {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "1thread": {"OMP_NUM_THREADS": "1"}}


def positive_int(text: str) -> int:
    """argparse type for counts (--steps, --rounds, --batch, ...): an int >= 1, else a usage error.

    The same rule as `iepjax.distributed.positive_int`, kept here because these scripts also run
    under a PyTorch-only interpreter that cannot import iepjax (jax).
    """
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: give 1 or more")
    return n


def env(extra: dict | None = None) -> dict:
    """os.environ with this checkout first on PYTHONPATH, plus `extra`."""
    out = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out.update(extra or {})
    return out


def load_torch_reference(path: str | Path):
    """`../shared/bench/torch_reference.py` (or `path`) imported as a module (needs torch)."""
    spec = importlib.util.spec_from_file_location("torch_reference", path)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    return ref
