"""Data parallelism with JAX's own sharding: one 1-D device mesh, the batch split over it.

Everything here is a thin layer over `jax.make_mesh`, `NamedSharding` and `jax.jit` with
`in_shardings`/`out_shardings`: parameters are replicated on every device, the batch axis of
images and of every per-image output is split over the mesh axis "data". XLA partitions the
program (GSPMD); for training it inserts the all-reduce that averages the gradients.

The same code runs in one process (the mesh holds `jax.devices()`) and in several processes
started with `jax.distributed.initialize` (the mesh holds every process's devices; each process
feeds its own rows with `jax.make_array_from_process_local_data` and reads back its own rows
with `local_rows`). One device is a mesh of one: the callers have a single code path for any
device count, and on one device it computes the same values, bit for bit, as plain `jax.jit`.
See docs/scaling.md.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from iepjax.config import ProjectionConfig, join_traced, split_traced
from iepjax.projection import ProjectionResult, check_images, project_batch
from iepjax.training_step import train_step

DATA = "data"


def make_mesh(devices: int | None = None, *, divides: int | None = None) -> Mesh:
    """A 1-D mesh ("data",) over the first `devices` devices of every process (all by default).

    In one process that is `jax.devices()[:devices]`; with several processes `devices` counts
    devices per process and the mesh holds that many of each process's local devices. With
    `devices` None and `divides` given (a training batch size), the most devices per process
    whose total divides it. `make_mesh(1)` is the one-device mesh (one device per process).
    """
    per_process = jax.local_device_count()
    if devices is not None:
        if not 1 <= devices <= per_process:
            raise ValueError(f"--devices {devices}: this process sees {per_process} device(s) "
                             f"({jax.local_devices()[0].platform}); choose 1..{per_process}")
        per_process = devices
    elif divides is not None:
        per_process = devices_dividing(divides, per_process, jax.process_count())
    chosen = [d for p in range(jax.process_count())
              for d in [d for d in jax.devices() if d.process_index == p][:per_process]]
    return Mesh(np.asarray(chosen), (DATA,))


def devices_dividing(batch: int, per_process: int, processes: int = 1) -> int:
    """The most devices per process, at most `per_process`, whose total divides `batch` (at least 1)."""
    return max([k for k in range(1, per_process + 1) if batch % (k * processes) == 0], default=1)


def local_size(mesh: Mesh) -> int:
    """Number of the mesh's devices that belong to this process."""
    return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copy a pytree of arrays (same values in every process) onto every device of the mesh."""
    rep = replicated(mesh)

    def put(leaf):
        a = np.asarray(jax.device_get(leaf))
        return jax.make_array_from_callback(a.shape, rep, lambda idx: a[idx])
    return jax.tree.map(put, tree)


def shard_batch(x_local: np.ndarray, mesh: Mesh) -> jax.Array:
    """Global array whose rows are every process's `x_local` (in process order), split over the mesh.

    Each process passes its own rows; their count must be a multiple of `local_size(mesh)` and
    the same in every process.
    """
    if len(x_local) % local_size(mesh):
        raise ValueError(f"{len(x_local)} rows do not split evenly over {local_size(mesh)} local devices: "
                         "pad the batch to a multiple of the device count (see pad_to)")
    return jax.make_array_from_process_local_data(batch_sharding(mesh), np.asarray(x_local))


def local_rows(tree: Any) -> Any:
    """The rows this process holds of every batch-sharded array of a pytree, as numpy, in order.

    Replicated arrays (no batch split) come back whole. In one process this equals `device_get`.
    """
    def get(a):
        if not isinstance(a, jax.Array) or a.is_fully_addressable:
            return np.asarray(jax.device_get(a))
        if a.ndim == 0 or a.is_fully_replicated:
            return np.asarray(a.addressable_shards[0].data)
        by_start = {}
        for s in a.addressable_shards:  # replicas of the same rows: keep one
            by_start.setdefault(s.index[0].start or 0, s.data)
        return np.concatenate([np.asarray(by_start[k]) for k in sorted(by_start)])
    return jax.tree.map(get, tree)


def pad_to(x: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
    """Pad the batch axis to a multiple of `multiple` by repeating the last row; return (x, real rows)."""
    real = len(x)
    extra = -real % multiple
    if extra:
        x = np.concatenate([x, np.repeat(x[-1:], extra, axis=0)])
    return x, real


def fixed_batches(x: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """(batch, real rows) over the leading axis of `x` (N rows), every batch of one shape, so that a
    jitted function compiles once: ceil(N / batch_size) batches of equal size (at most
    `batch_size`), the last padded by repeating its final row (`pad_to`); drop a batch's outputs
    beyond its real rows. No batch for N = 0."""
    n = len(x)
    if n == 0:
        return
    size = -(-n // -(-n // batch_size))
    for i in range(0, n, size):
        yield pad_to(x[i:i + size], size)


def data_parallel(fn: Callable, mesh: Mesh, *, static: tuple[str, ...] = ("config",),
                  out_replicated: bool = False, donate: bool = False, replicated_after: int = 0) -> Callable:
    """`jax.jit(fn)` for `fn(params_or_state, batch, *rest, **static)` split over the mesh.

    The first argument is replicated, the second split on its leading axis, and the
    `replicated_after` non-static arguments after them replicated; outputs are split on their
    leading axis (or replicated with `out_replicated`, e.g. a new training state and the
    batch-mean loss, for which XLA adds the cross-device mean).
    """
    out = replicated(mesh) if out_replicated else batch_sharding(mesh)
    ins = (replicated(mesh), batch_sharding(mesh)) + (replicated(mesh),) * replicated_after
    return jax.jit(fn, static_argnames=static, in_shardings=ins, out_shardings=out,
                   donate_argnums=(0,) if donate else ())


@functools.lru_cache(maxsize=32)
def _data_parallel_cached(fn: Callable, mesh: Mesh) -> Callable:
    """`fn(params, batch, config)` as a program `(params, batch, config, values)` split over the mesh:
    a projection config's alpha, lam and stop_loss are traced (`config.split_traced`), the rest static."""
    def call(params, batch, config, values):
        return fn(params, batch, join_traced(config, values) if values else config)
    return data_parallel(call, mesh, replicated_after=1)


def run_batched(fn: Callable, params: dict, x_BxHxWxC: np.ndarray, config: Any, mesh: Mesh) -> Any:
    """`fn(params, x, config)` (per-image outputs on the leading axis) with the batch split over the mesh.

    A `ProjectionConfig`'s alpha, lam and stop_loss enter the program traced, so configs differing
    only in them share it. `x_BxHxWxC`: this process's rows; padded here (last row repeated) to a
    multiple of the local device count and the padding dropped again. Returns this process's B rows of every output as
    numpy. With several processes every process must call it with the same B. `params` may be
    host arrays or already replicated (`replicate`; do it once when calling this in a loop).
    """
    x, real = pad_to(np.asarray(x_BxHxWxC), local_size(mesh))
    if not _is_replicated_on(params, mesh):
        params = replicate(params, mesh)
    key, values = split_traced(config) if isinstance(config, ProjectionConfig) else (config, {})
    out = _data_parallel_cached(fn, mesh)(params, shard_batch(x, mesh), key, values)
    return jax.tree.map(lambda a: a[:real], local_rows(out))


def project_sharded(params: dict, x0_BxHxWxC: np.ndarray, config: ProjectionConfig,
                    mesh: Mesh) -> ProjectionResult:
    """`project_fn` with the batch split over the mesh: jit(vmap(project_image)), params replicated.

    Same values as `project_fn(params, x0, config)` up to float rounding, for any batch size
    (a short batch is padded to a multiple of the device count, the padding dropped). Returns
    this process's rows as numpy; see `run_batched`.
    """
    check_images(x0_BxHxWxC, config)
    return run_batched(project_batch, params, np.asarray(x0_BxHxWxC, np.float32), config, mesh)


def _is_replicated_on(tree: Any, mesh: Mesh) -> bool:
    rep = replicated(mesh)
    return all(isinstance(a, jax.Array) and a.sharding == rep for a in jax.tree.leaves(tree))


def train_step_sharded(mesh: Mesh) -> Callable:
    """`training_step.train_step` split over the mesh: state replicated, batch split, gradients all-reduced.

    Returns `step(state, batch_BxHxWxC, config) -> (state, terms)`; `state` must be replicated
    (`replicate`) and the batch a `shard_batch` array. Same result as the one-device step up to
    float rounding (the per-image sampling keys do not depend on the split).
    """
    return _train_step_sharded(mesh)


def training_on(mesh: Mesh, state: Any) -> tuple[Any, Callable, Callable]:
    """(state, step, put) to train on `mesh`: the state replicated on it, `train_step_sharded(mesh)`
    (`step(state, batch, config) -> (state, terms)`), and `put(batch_BxHxWxC)`, which makes a host
    batch (this process's rows) the step's input, split over the mesh."""
    return replicate(state, mesh), train_step_sharded(mesh), functools.partial(shard_batch, mesh=mesh)


@functools.lru_cache(maxsize=8)
def _train_step_sharded(mesh: Mesh) -> Callable:
    return data_parallel(lambda state, batch, config: train_step(state, batch, config), mesh,
                         out_replicated=True, donate=True)


__all__ = ["DATA", "make_mesh", "devices_dividing", "local_size", "batch_sharding", "replicated", "replicate", "shard_batch",
           "local_rows", "pad_to", "fixed_batches", "data_parallel", "run_batched", "project_sharded",
           "train_step_sharded", "training_on"]
