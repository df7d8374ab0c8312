"""Several processes (one per host or per accelerator) with `jax.distributed`.

    initialize(coordinator="10.0.0.1:12345", num_processes=4, process_id=2)

Every process runs the same script. Each takes its contiguous share of the images
(`process_rows`), the sharded program runs over every process's devices (`iepjax.sharding`),
and `gather_rows` puts the results of all processes back together, in the original order, in
every process; process 0 (`is_main`) writes the outputs. With one process every function here
is the identity, so library code calls them unconditionally. See docs/scaling.md.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable, TypeVar

import jax
import numpy as np

from iepjax.cli import positive_int  # re-exported: the scripts' --cpu-devices type

T = TypeVar("T")
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # read by jax.distributed itself too
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `initialize_from_args` (for train.py and project.py)."""
    g = parser.add_argument_group("multi-process (jax.distributed; see docs/scaling.md)")
    g.add_argument("--devices", type=int, default=None,
                   help="devices to split each batch over, per process (default: all visible)")
    g.add_argument("--cpu-devices", type=positive_int, default=None,
                   help="on CPU: split the cores into this many JAX devices (default: one per core in a "
                        "single process, 1 per process with several; XLA:CPU runs each convolution on one "
                        "core, so one device per core is what uses them all)")
    g.add_argument("--coordinator", default=None, help=f"host:port of process 0 (env {ENV_COORDINATOR})")
    g.add_argument("--num-processes", type=int, default=None, help=f"number of processes (env {ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", type=int, default=None, help=f"this process, 0..N-1 (env {ENV_PROCESS_ID})")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize and let JAX detect what is not given (SLURM, Open MPI, TPU)")


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, auto: bool = False) -> bool:
    """Join the process group when asked to; return whether this is a multi-process run.

    Each value comes from the argument, else the environment (JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID). Nothing given and `auto` False: one process, nothing
    done. Otherwise `jax.distributed.initialize`, which fills in what is missing on SLURM, Open MPI
    and Cloud TPU. Must run before anything else touches JAX devices.
    """
    settings = _requested(coordinator, num_processes, process_id, auto)
    if settings is None:
        return False
    jax.distributed.initialize(*settings)
    return jax.process_count() > 1


def _requested(coordinator: str | None, num_processes: int | None, process_id: int | None,
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


def initialize_from_args(args: argparse.Namespace) -> bool:
    """`use_cpu_cores` and `initialize` from the flags of `add_flags`.

    One process: one CPU device per core (or `--cpu-devices`). Several: one CPU device per process
    unless `--cpu-devices` says otherwise (the processes already share the cores).
    """
    multi = _requested(args.coordinator, args.num_processes, args.process_id, args.distributed) is not None
    if args.cpu_devices is not None or not multi:
        use_cpu_cores(args.cpu_devices)
    return initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)


def cpu_cores() -> int:
    """Cores this process may run on (its CPU affinity, else `os.cpu_count()`)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def use_cpu_cores(n: int | None = None) -> int:
    """Make JAX's CPU backend `n` devices (default: one per core); return the count in effect.

    XLA:CPU runs each convolution on a single thread, so a one-device CPU backend leaves all
    cores but one idle during the projection and training; with one device per core and the
    batch split over them (`iepjax.sharding`) every core works (2.0x on 2 cores, benchmarks/).
    Only the CPU backend is affected (GPU/TPU devices are untouched). Must run before JAX
    initialises its backends. With `n` None, a count already chosen wins: `jax_num_cpu_devices`
    set by the caller (or $JAX_NUM_CPU_DEVICES), `--xla_force_host_platform_device_count` in
    XLA_FLAGS, or backends already running; nothing is changed then.
    """
    if n is None:
        from jax._src import xla_bridge  # no public query for "backends initialised"
        if jax.config.jax_num_cpu_devices >= 0:
            return jax.config.jax_num_cpu_devices
        if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") \
                or xla_bridge.backends_are_initialized():
            return len(jax.devices("cpu"))
    n = cpu_cores() if n is None else n
    if n < 1:
        raise ValueError(f"--cpu-devices {n}: give 1 or more")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as e:
        raise RuntimeError("use_cpu_cores must run before the first JAX computation "
                           "(call it right after `import jax`)") from e
    return n


def cpu_devices_chosen() -> int:
    """CPU devices per process as `use_cpu_cores` set them, else one per core; starts no JAX backend."""
    n = jax.config.jax_num_cpu_devices
    return n if n >= 1 else cpu_cores()


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


__all__ = ["add_flags", "positive_int", "initialize", "initialize_from_args", "cpu_cores", "use_cpu_cores", "cpu_devices_chosen",
           "is_main", "process_rows", "gather_rows",
           "broadcast_text", "main_first", "barrier"]
