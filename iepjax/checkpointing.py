"""Orbax checkpoints of a training run: parameters, optimiser state, step, resolved config.

Every orbax call of the project lives here. Saves are atomic (orbax writes to a temporary
folder and renames it) and asynchronous; `close` waits for them.

Checkpoints move between machines: orbax stores each array's sharding (the devices it was
trained on), and restoring without a target sharding asks for that same topology ("Topology
mismatch detected" on a machine with another device count). `restore` therefore always gives
orbax a target: the sharding of the concrete arrays passed in (a resumed training keeps its
mesh, whatever mesh the checkpoint was written from), else a single device of this process
(`target_device`). Where a run was trained is recorded beside it (`trained_on`), for information
only: loading never depends on it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's suffix of a step folder still being written
_STEP = re.compile(r"^\d+$")        # a finished step folder (orbax's default naming: the step number)


def manager(ckpt_dir: str | os.PathLike, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """A CheckpointManager over `ckpt_dir` (created if missing), keeping the last `max_to_keep` steps."""
    return ocp.CheckpointManager(Path(ckpt_dir).absolute(),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def reader(ckpt_dir: str | os.PathLike) -> ocp.CheckpointManager:
    """A CheckpointManager for reading an existing `ckpt_dir`: it creates, deletes and cleans nothing
    there (no `create`, no `max_to_keep`, no saves), so a training may be writing the folder meanwhile.
    (orbax's own `read_only` option does the same but logs warnings on every use.)"""
    return ocp.CheckpointManager(Path(ckpt_dir).absolute(), options=ocp.CheckpointManagerOptions(create=False))


def where_trained() -> dict:
    """Where this process runs: backend, device kind and counts, jax / orbax versions (informational)."""
    dev = jax.local_devices()[0]
    return {"backend": jax.default_backend(), "device_kind": dev.device_kind, "devices": jax.device_count(),
            "local_devices": jax.local_device_count(), "processes": jax.process_count(),
            "jax": jax.__version__, "orbax": getattr(ocp, "__version__", "unknown")}


def save(mngr: ocp.CheckpointManager, step: int, state: Any, config: dict) -> None:
    """Save the pytree `state` and the JSON-ready `config` as checkpoint `step` (asynchronous).

    The checkpoint also records `where_trained()` (item "trained_on"; read it with `trained_on`).
    """
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            config=ocp.args.JsonSave(config),
                                            trained_on=ocp.args.JsonSave(where_trained())))


def latest_step(mngr: ocp.CheckpointManager) -> int | None:
    """The newest complete checkpoint's step, or None when there is none."""
    return mngr.latest_step()


def complete_steps(ckpt_dir: str | os.PathLike) -> list[int]:
    """Steps of the finished checkpoints in `ckpt_dir`, ascending (read from the folder names only:
    orbax renames a step's temporary folder to the bare step number once it is complete)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if _STEP.match(p.name) and p.is_dir())


def stale_tmp(ckpt_dir: str | os.PathLike) -> list[Path]:
    """orbax's temporary step folders (`*.orbax-checkpoint-tmp*`) in `ckpt_dir`: the unfinished saves of
    an interrupted run. Only the run's owner may call them stale (`iepjax.runs.hold` removes them)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if TMP_MARK in p.name)


def target_device() -> jax.Device:
    """The device restored arrays go to when no sharding is asked for: `jax_default_device` if set,
    else this process's first device (never another process's: with `jax.distributed` every
    process restores its own full copy)."""
    d = jax.config.jax_default_device
    if isinstance(d, jax.Device):
        return d
    if isinstance(d, str):
        return jax.local_devices(backend=d)[0]
    return jax.local_devices()[0]


def abstract_target(tree: Any, device: jax.Device | None = None) -> Any:
    """The restore target of `tree`: a ShapeDtypeStruct per leaf, with the leaf's own sharding when it
    is a concrete jax.Array (or a ShapeDtypeStruct that names one), else a SingleDeviceSharding on
    `device` (default `target_device()`)."""
    single = jax.sharding.SingleDeviceSharding(device or target_device())

    def one(leaf):
        s = ocp.utils.to_shape_dtype_struct(leaf)
        if not isinstance(s, jax.ShapeDtypeStruct):  # a Python scalar
            return s
        sharding = getattr(s, "sharding", None)
        return s if sharding is not None else jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=single)
    return jax.tree.map(one, tree)


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restore (state, config) of `step` (default: the latest) into the structure of `abstract_state`.

    `abstract_state`: arrays (their shardings are the targets: a resumed training restores onto its
    mesh) or shapes only (`jax.eval_shape`; restored onto `target_device()`). Either way, the
    device count and backend the checkpoint was written on do not matter.
    """
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {mngr.directory} yet: train a model first (python train.py), "
                                "or wait for the running training's first checkpoint")
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_target(abstract_state)),
                                                     config=ocp.args.JsonRestore()))
    return out["state"], out["config"]


def _restore_json(ckpt_dir: str | os.PathLike, item: str) -> dict:
    mngr = reader(ckpt_dir)
    try:
        step = mngr.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt_dir} yet: train a model first (python train.py), "
                                    "or wait for the running training's first checkpoint")
        return mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
    finally:
        mngr.close()


def restore_config(ckpt_dir: str | os.PathLike) -> dict:
    """The config stored with the latest checkpoint in `ckpt_dir` (no arrays are read)."""
    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir} yet: train a model first (python train.py)")
    return _restore_json(ckpt_dir, "config")


def trained_on(ckpt_dir: str | os.PathLike) -> dict:
    """Where the latest checkpoint in `ckpt_dir` was written (`where_trained()` of the training
    process); {} for checkpoints that predate the record. Informational only."""
    try:
        return _restore_json(ckpt_dir, "trained_on")
    except FileNotFoundError:
        raise
    except Exception:  # noqa: BLE001 - an older checkpoint without the item: orbax's error type varies
        return {}


def close(mngr: ocp.CheckpointManager) -> None:
    """Wait for pending asynchronous saves and release the manager."""
    mngr.wait_until_finished()
    mngr.close()
