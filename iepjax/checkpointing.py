"""Orbax checkpoints of a training run: parameters, optimiser state, step, resolved config.

Every orbax call of the project lives here. Saves are atomic (orbax writes to a temporary
folder and renames it) and asynchronous; `close` waits for them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def manager(ckpt_dir: str | os.PathLike, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """A CheckpointManager over `ckpt_dir` (created if missing), keeping the last `max_to_keep` steps."""
    return ocp.CheckpointManager(Path(ckpt_dir).absolute(),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, config: dict) -> None:
    """Save the pytree `state` and the JSON-ready `config` as checkpoint `step` (asynchronous)."""
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            config=ocp.args.JsonSave(config)))


def latest_step(mngr: ocp.CheckpointManager) -> int | None:
    """The newest complete checkpoint's step, or None when there is none."""
    return mngr.latest_step()


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restore (state, config) of `step` (default: the latest) into the structure of `abstract_state`."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {mngr.directory}: train a model first (python train.py)")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                     config=ocp.args.JsonRestore()))
    return out["state"], out["config"]


def restore_config(ckpt_dir: str | os.PathLike) -> dict:
    """The config stored with the latest checkpoint in `ckpt_dir` (no arrays are read)."""
    mngr = manager(ckpt_dir)
    step = mngr.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}: train a model first (python train.py)")
    out = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    mngr.close()
    return out["config"]


def close(mngr: ocp.CheckpointManager) -> None:
    """Wait for pending asynchronous saves and release the manager."""
    mngr.wait_until_finished()
    mngr.close()
