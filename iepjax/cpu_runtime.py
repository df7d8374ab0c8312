"""CPU runtime tuning, opt-in: the scripts call it before any JAX work; the library never imports it.

Three settings for XLA:CPU, none of which changes a computed value:

* **One JAX device per core** (`use_cpu_cores`). XLA:CPU runs each convolution on a single
  thread, so a one-device CPU backend leaves all cores but one idle; with one device per core
  and each batch split over them (`iepjax.sharding`) every core works.
* **Freed host memory kept for reuse** (`reuse_freed_memory`, applied by `for_training` where it
  pays). XLA:CPU takes each execution's temporary buffer from `malloc` and frees it when the
  execution ends. A training step's buffer grows with the batch and the image size
  (`train_temp_bytes`); above 32 MiB glibc serves it with a fresh `mmap` (it always maps such
  requests, and the arena of a worker thread cannot hold a chunk above 64 MiB), so every step the
  kernel maps the buffer again and faults in and zero-fills its pages, a large share of the
  step's CPU time. Setting glibc's malloc to serve every request from the main heap (one arena,
  no `mmap`) and never to trim it makes each step reuse the pages of the step before. It has
  costs, hence only for large buffers: the threads then share one arena (compiles take longer,
  small steps can run slower), and what the process frees stays mapped (reused, not leaked).
* **Advice for long projections** (`long_projection_advice`). While every thread of XLA:CPU's
  pool runs a device's program, its thread pool keeps a task per parallel loop of a convolution
  until the call returns, so the resident memory grows with the number of projection steps.
  One pool thread more than devices (`PJRT_NPROC=<devices + 1>`) keeps it flat, at some speed
  cost, so it is advice, not a default.

`heap_in_use` reads how much of glibc's heap is allocated, for the benchmarks. Measurements:
benchmarks/README.md.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys

import jax

from iepjax.config import TrainConfig

# mallopt parameters of glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1))
MMAP_ALWAYS_BYTES = 32 * 2 ** 20  # glibc maps every request above this (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit)
# XLA:CPU's temporary buffer of `training_step.train_step` per input pixel of the per-device batch,
# as measured from 32 to 256 px (1 or 3 channels, both decoders; benchmarks/README.md).
TRAIN_TEMP_BYTES_PER_PIXEL = 300
ACCELERATOR_PLUGINS = ("jax-cuda", "jax-rocm", "libtpu", "jax-metal")  # prefixes of the plugins' package names


def glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (Linux), else None (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded in this process, libc's among them
        libc.gnu_get_libc_version, libc.mallopt  # glibc only
    except (OSError, AttributeError):
        return None
    return libc


class _Mallinfo2(ctypes.Structure):  # glibc >= 2.33, <malloc.h>
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def heap_in_use() -> int | None:
    """Bytes the process holds from glibc's malloc now (arenas' allocated chunks + mmapped chunks),
    or None off glibc (or before 2.33). Free memory kept by malloc does not count, unlike RSS."""
    libc = glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _Mallinfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (one arena, no mmap, no trim); True if done.

    Process-wide and irreversible; call it at start-up, before JAX runs anything (threads that
    already have an arena keep it). Returns False, changing nothing, where the C library is not
    glibc. Safe to call more than once.
    """
    libc = glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)


def train_temp_bytes(config: TrainConfig, devices: int) -> int:
    """Typical size of XLA:CPU's temporary buffer of one training step, per device (bytes), with the
    batch split over the most of `devices` that divide it (as `sharding.make_mesh` splits it)."""
    from iepjax.sharding import devices_dividing  # here: the predictor's scripts import this module without flax
    per_device = config.batch_size // devices_dividing(config.batch_size, devices)
    return per_device * config.model.size ** 2 * TRAIN_TEMP_BYTES_PER_PIXEL


def runs_on_cpu() -> bool:
    """True unless JAX is told to use, or can find, an accelerator (JAX_PLATFORMS, installed plugins).

    Decided without starting JAX's backends, which must not have run before `reuse_freed_memory`.
    """
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    names = ((d.metadata["Name"] or "").lower().replace("_", "-") for d in importlib.metadata.distributions())
    return not any(name.startswith(ACCELERATOR_PLUGINS) for name in names)


def for_training(config: TrainConfig, devices: int) -> bool:
    """`reuse_freed_memory` when training runs on CPU and its per-device temporary buffer is above
    glibc's mmap limit (`train_temp_bytes` > 32 MiB, e.g. 128 px at batch 8 or more per device);
    return whether it was applied. Call before JAX runs anything."""
    if train_temp_bytes(config, devices) <= MMAP_ALWAYS_BYTES or not runs_on_cpu():
        return False
    return reuse_freed_memory()


def cpu_cores() -> int:
    """Cores this process may run on (its CPU affinity, else `os.cpu_count()`)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def use_cpu_cores(n: int | None = None) -> int:
    """Make JAX's CPU backend `n` devices (default: one per core); return the count in effect.

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


LONG_PROJECTION_STEPS = 1000  # from here on the held memory is worth the advice


def long_projection_advice(steps: int, devices: int) -> str | None:
    """A note for a projection of `steps` steps on CPU over `devices` devices per process when
    `PJRT_NPROC` is not set and the projection is long; None otherwise."""
    if steps < LONG_PROJECTION_STEPS or os.environ.get("PJRT_NPROC") or not runs_on_cpu():
        return None
    return (f"note: {steps} projection steps on CPU: XLA:CPU's thread pool holds memory that grows with the "
            f"steps until each batch returns; PJRT_NPROC={devices + 1} (one thread more than devices) keeps it "
            "flat, at some cost in speed")


__all__ = ["cpu_cores", "use_cpu_cores", "cpu_devices_chosen", "glibc", "heap_in_use", "reuse_freed_memory",
           "train_temp_bytes", "runs_on_cpu", "for_training", "long_projection_advice"]
