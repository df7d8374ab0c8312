"""Host memory for XLA:CPU training: freed memory is kept and reused instead of returned to the kernel.

XLA:CPU takes each execution's temporary buffer from `malloc` and frees it when the execution
ends. For a 128x128x3 training step at batch 16 per device that buffer is ~100 MB per device,
and glibc serves such a request with a fresh `mmap`: it always maps requests above 32 MiB, and
the arena of a thread (XLA's worker threads have their own) cannot hold a chunk above 64 MiB at
all. So every step the kernel maps the buffer again, faults its pages in one by one and
zero-fills them: 53 000 page faults and ~110 ms of system time per two-device step, a quarter of
its CPU time (benchmarks/README.md, item 12). PyTorch's tensors stay below those limits and reuse
the heap.

`reuse_freed_memory` sets glibc's malloc to serve every request from the main heap (one arena,
no `mmap`) and never to trim it, so each step reuses the pages of the step before. It has costs,
so `for_training` applies it only where the buffer is that large: the threads then share one
arena (compiling takes ~25 % longer, and the 64 px model's step ran up to 30 % slower), and what
the process frees stays mapped (reused, not leaked).

`heap_in_use` reads how much of the heap is allocated, for the benchmarks: XLA:CPU's runtime keeps
~25 KB per projection step and device (~50 MB per 1 000 steps on two devices) until the call returns
when every thread of its pool runs a device's program (benchmarks/README.md, item 14).
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys

from iepjax.config import TrainConfig
from iepjax.sharding import devices_dividing

# mallopt parameters of glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1))
MMAP_ALWAYS_BYTES = 32 * 2 ** 20  # glibc maps every request above this (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit)
# XLA:CPU's temporary buffer of `training.train_step` per input pixel of the per-device batch: 244-388
# bytes measured from 64 to 256 px (1 or 3 channels, both decoders, batch 4-16; 210 at 32 px;
# benchmarks/README.md, item 12).
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


__all__ = ["glibc", "heap_in_use", "reuse_freed_memory", "train_temp_bytes", "runs_on_cpu", "for_training"]
