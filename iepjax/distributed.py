"""Several processes (one per host or per accelerator) with `jax.distributed`.

    initialize(coordinator="10.0.0.1:12345", num_processes=4, process_id=2)

Every process runs the same script. Each takes its contiguous share of the images
(`process_rows`), the sharded program runs over every process's devices (`iepjax.sharding`),
and `gather_rows` puts the results of all processes back together, in the original order, in
every process; process 0 (`is_main`) writes the outputs. With one process every function here
is the identity, so library code calls them unconditionally. The scripts' flags for it are
`iepjax.cli.add_runtime_flags`. See docs/scaling.md.
"""
from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import jax
import numpy as np

T = TypeVar("T")
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # read by jax.distributed itself too
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, auto: bool = False) -> bool:
    """Join the process group when asked to; return whether this is a multi-process run.

    Each value comes from the argument, else the environment (JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID). Nothing given and `auto` False: one process, nothing
    done. Otherwise `jax.distributed.initialize`, which fills in what is missing on SLURM, Open MPI
    and Cloud TPU. Must run before anything else touches JAX devices.
    """
    settings = requested(coordinator, num_processes, process_id, auto)
    if settings is None:
        return False
    jax.distributed.initialize(*settings)
    return jax.process_count() > 1


def requested(coordinator: str | None, num_processes: int | None, process_id: int | None,
              auto: bool) -> tuple[str | None, int | None, int | None] | None:
    """The (coordinator, num_processes, process_id) `initialize` will use, each from the argument
    or else the environment; None when no process group is asked for."""
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    if not auto and (num_processes == 1 or (coordinator is None and num_processes is None and process_id is None)):
        return None
    return coordinator, num_processes, process_id


def is_main() -> bool:
    """True in process 0, the one that writes files and prints results."""
    return jax.process_index() == 0


def process_rows(n: int) -> tuple[np.ndarray, int]:
    """Indices of this process's contiguous share of n items, and how many of them are real.

    Every process gets ceil(n / P) indices (the same count, so they run the same number of
    batches in step); a short share is padded by repeating its last (or the overall last) index.
    """
    p, k = jax.process_count(), jax.process_index()
    per = -(-n // p)
    real = np.arange(k * per, min((k + 1) * per, n))
    pad = np.full(per - len(real), real[-1] if len(real) else n - 1)
    return np.concatenate([real, pad]).astype(np.int64), len(real)


def gather_rows(tree: Any, n: int) -> Any:
    """Inverse of `process_rows`: every process's per-share arrays (ceil(n/P), ...) -> (n, ...) in order.

    Every process receives the full arrays (an all-gather across processes).
    """
    p = jax.process_count()
    if p == 1:
        return jax.tree.map(lambda a: np.asarray(a)[:n], tree)
    from jax.experimental import multihost_utils
    per = -(-n // p)
    full = multihost_utils.process_allgather(tree, tiled=True)  # (p * per, ...): padding at each share's end
    keep = np.concatenate([np.arange(k * per, min((k + 1) * per, n)) for k in range(p)
                           if k * per < n] or [np.zeros(0, np.int64)])
    return jax.tree.map(lambda a: np.asarray(a)[keep], full)


def broadcast_text(text: str | None, *, max_bytes: int = 4096) -> str:
    """Process 0's `text` in every process (e.g. the run folder it chose)."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils
    buf = np.zeros(max_bytes, np.uint8)
    if is_main():
        raw = text.encode("utf-8")
        if len(raw) > max_bytes:
            raise ValueError(f"text longer than {max_bytes} bytes")
        buf[:len(raw)] = np.frombuffer(raw, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return bytes(out).rstrip(b"\0").decode("utf-8")


def main_first(fn: Callable[[], T]) -> T:
    """`fn()` in process 0 first, then in the others (e.g. preparing a data set once, then reading it)."""
    if jax.process_count() == 1:
        return fn()
    if is_main():
        out = fn()
        barrier("iepjax-main-first")
        return out
    barrier("iepjax-main-first")
    return fn()


def barrier(name: str) -> None:
    """Wait until every process reaches the same `name`."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


__all__ = ["initialize", "requested", "is_main", "process_rows", "gather_rows", "broadcast_text", "main_first",
           "barrier"]
