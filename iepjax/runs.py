"""Run folders: results/<model>/<dataset>/<category>/v<N>/ with a `latest` link.

A run folder holds the resolved config, checkpoints/, train_log.csv, training.json and one
sub-folder per projection run under projections/.

Concurrency and interruptions (see `iepjax.atomic`):

* a new run folder is claimed with an exclusive `os.mkdir` under the category's claim lock, so
  concurrent claims always get distinct folders; the claiming process then holds the run's owner
  lock (`hold`) for as long as it lives, and no other process may train into it (`resume_or_new`);
* output folders (projections/v<N>, inference/v<N>) are written under a hidden temporary name and
  renamed to v<N> when complete (`new_output`): a v<N> under its final name is complete, and their
  `latest` link is only moved to a complete folder. Leftovers of killed writers are removed when the
  next output folder is started there;
* the category's `latest` names the run that `train.py` continues: the newest run, finished or
  not. `find_run` refuses a run that has no complete checkpoint yet with a message, not a traceback.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import Iterator

from iepjax import atomic

_VERSION = re.compile(r"^v(\d+)$")
OWNER_LOCK = atomic.LOCK_NAME  # in a run folder: held by the process that trains into it


def category_dir(root: str | os.PathLike, model: str, dataset: str, category: str) -> Path:
    """results/<model>/<dataset>/<category>."""
    return Path(root) / model / dataset / category


def versions(cat_dir: Path) -> list[int]:
    """Version numbers N of the existing v<N> folders, ascending."""
    if not cat_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in cat_dir.iterdir() if (m := _VERSION.match(p.name)) and p.is_dir())


def latest_run(cat_dir: Path) -> Path | None:
    """The run that `latest` points to (else the highest v<N>), or None when there is none."""
    link = cat_dir / "latest"
    if link.is_symlink() or link.is_dir():
        target = link.resolve()
        if target.is_dir():
            return target
    v = versions(cat_dir)
    return cat_dir / f"v{v[-1]}" if v else None


def _tidy(parent: Path) -> None:
    """Remove temporary `latest` links left by a process killed inside `set_latest` (call under the
    parent's claim lock, under which `set_latest` is always called here)."""
    if parent.is_dir():
        for p in parent.iterdir():
            if p.name.startswith(".latest.tmp-") and p.is_symlink():
                p.unlink(missing_ok=True)


def _claimed(parent: Path) -> set[int]:
    """Numbers taken under `parent`: v<N> folders and the hidden temporary folders of unfinished ones."""
    taken = set(versions(parent))
    if parent.is_dir():
        for p in parent.iterdir():
            if atomic.is_partial(p.name) and (m := _VERSION.match(atomic.partial_target(p.name))):
                taken.add(int(m.group(1)))
    return taken


def new_run(cat_dir: Path) -> Path:
    """Claim the next v<N> folder, hold it (`hold`) and point `latest` at it; return it.

    The claim is an exclusive `os.mkdir` under the category's claim lock: processes and threads
    claiming at the same time get distinct folders (a v<N> that appears meanwhile, made by older
    code or by hand, is skipped: the next number is tried).
    """
    cat_dir = Path(cat_dir)
    with atomic.claim_lock(cat_dir):
        _tidy(cat_dir)
        n = max(_claimed(cat_dir), default=-1) + 1
        while True:
            run = cat_dir / f"v{n}"
            try:
                os.mkdir(run)
                break
            except FileExistsError:
                n += 1
        if not hold(run):  # nobody else can know the new folder yet: only a bug gets here
            raise RuntimeError(f"{run} was just created but another process holds it")
        set_latest(cat_dir, run)
    return run


def set_latest(cat_dir: Path, run: Path) -> None:
    """Point cat_dir/latest at `run` (relative symlink, swapped in with os.replace)."""
    cat_dir = Path(cat_dir)
    tmp = cat_dir / f".latest.tmp-{os.getpid()}-{threading.get_ident()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(Path(run).name, tmp)
    os.replace(tmp, cat_dir / "latest")


# --------------------------------------------------------------------------- run ownership

_OWNED: dict[str, atomic.Lock] = {}
_OWNED_GUARD = threading.Lock()


def hold(run_dir: Path) -> bool:
    """Take the run's owner lock for this process (kept until `release` or the process ends).

    True when this process holds it now (also when it already did), False when another live
    process does. The first time a process takes a run, leftovers of a killed writer are removed
    from its checkpoints/ (orbax's temporary `*.orbax-checkpoint-tmp*` folders): the owner lock
    guarantees that nobody is writing them.
    """
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    with _OWNED_GUARD:
        if key in _OWNED:
            return True
        lock = atomic.try_lock(run_dir / OWNER_LOCK)
        if lock is None:
            return False
        _OWNED[key] = lock
    from iepjax import checkpointing
    for p in checkpointing.stale_tmp(run_dir / "checkpoints"):
        shutil.rmtree(p, ignore_errors=True)
        print(f"note: removed {p}, a checkpoint an interrupted run had not finished writing", file=sys.stderr)
    return True


def release(run_dir: Path) -> None:
    """Give up this process's owner lock on the run (if it holds it)."""
    with _OWNED_GUARD:
        lock = _OWNED.pop(str(Path(run_dir).resolve()), None)
    if lock is not None:
        lock.release()


def holder(run_dir: Path) -> int | None:
    """Process id of another live process that holds the run (training into it now), else None."""
    run_dir = Path(run_dir)
    if str(run_dir.resolve()) in _OWNED or not (run_dir / OWNER_LOCK).exists():
        return None
    try:
        lock = atomic.try_lock(run_dir / OWNER_LOCK)
    except OSError:  # a run folder this process may only read: nobody it could see trains there
        return None
    if lock is not None:
        lock.release()
        return None
    return atomic.lock_holder(run_dir / OWNER_LOCK) or -1


def resume_or_new(cat_dir: Path, candidate: Path | None) -> Path:
    """The run to train into: `candidate` (a run to resume), held by this process, or a new run
    (`new_run`) when there is no candidate or another process is training it right now.

    Under the category's claim lock, so two processes never both take one folder: started together
    with the same settings, the first continues (or creates) the run and the second gets the next
    v<N>, with a note on stderr.
    """
    cat_dir = Path(cat_dir)
    with atomic.claim_lock(cat_dir):
        if candidate is not None:
            if hold(candidate):
                return Path(candidate)
            print(f"note: {candidate} is being trained by another process (pid {holder(candidate)}): "
                  "training into a new run folder", file=sys.stderr)
        return new_run(cat_dir)


# --------------------------------------------------------------------------- output folders


@contextlib.contextmanager
def new_output(parent: Path) -> Iterator[atomic.OutputFolder]:
    """Write the next numbered output folder parent/v<N> completely or not at all.

    Yields an `atomic.OutputFolder`: write into `.path` (a hidden temporary folder that already
    reserves v<N>; `.final` is parent/v<N>). On normal exit it is renamed to v<N> (or the next free
    number, should v<N> have appeared meanwhile: `.final` then names it) and parent/latest is
    pointed at it; on an exception it is deleted. Leftovers of killed writers under `parent` are
    removed first (`atomic.clean_leftovers`, with a note on stderr).
    """
    parent = Path(parent)
    atomic.clean_leftovers(parent)
    with atomic.claim_lock(parent):
        _tidy(parent)
        out = atomic.begin_folder(parent / f"v{max(_claimed(parent), default=-1) + 1}")
    try:
        yield out
    except BaseException:
        out.abort()
        raise
    with atomic.claim_lock(parent):
        final = out.final
        while True:
            try:
                out.commit(final)
                break
            except FileExistsError:
                final = parent / f"v{max(_claimed(parent), default=-1) + 1}"
        set_latest(parent, out.final)


def find_run(root: str | os.PathLike, model: str, dataset: str, category: str, run: str | None = None) -> Path:
    """The run folder to use: `run` (a path or a v<N> name) or the latest; a clear error if missing.

    Errors (one message each, saying what to do): no such run (FileNotFoundError); a run trained
    on another dataset or category (ValueError: its model does not fit this data); a run of another
    model than `model` ("vae", "ae_l2", "ae_ssim"; ValueError, `check_run_model`); a run with no
    complete checkpoint yet, being trained now or stopped before its first checkpoint
    (FileNotFoundError).
    """
    cat_dir = category_dir(root, model, dataset, category)
    if run:
        p = Path(run)
        for cand in (p, cat_dir / run):
            if (cand / "checkpoints").is_dir() or (cand / "config.json").is_file():
                found = cand.resolve()
                break
        else:
            raise FileNotFoundError(f"run {run!r} not found (looked for {p}/checkpoints and "
                                    f"{cat_dir / run}/checkpoints); "
                                    f"existing runs: {[f'v{n}' for n in versions(cat_dir)] or 'none'}")
        check_run_fits(found, dataset, category)
    else:
        found = latest_run(cat_dir)
        if found is None or not found.is_dir():
            raise FileNotFoundError(f"no trained run for {dataset}/{category} under {cat_dir}: "
                                    f"train one first with `python train.py --category {category}`")
    check_run_model(found, model)
    _check_has_checkpoint(found, category, explicit=bool(run))
    return found


def run_model(run_dir: str | os.PathLike) -> str | None:
    """The paper's name of a run's model ("vae", "ae_l2", "ae_ssim"), from the loss in its config.json;
    None when the run has no config.json."""
    from iepjax.config import AE_LOSSES
    if not (Path(run_dir) / "config.json").is_file():
        return None
    likelihood = model_config(run_dir).get("likelihood")
    return {loss: name for name, loss in AE_LOSSES.items()}.get(likelihood, "vae")


def check_run_model(run_dir: Path, model: str) -> None:
    """Raise ValueError when the run's config.json says it trained another model than `model`: a run of
    one model is never read as another (its loss would be the wrong energy, its row the wrong one)."""
    stored = run_model(run_dir)
    if stored is not None and stored != model:
        raise ValueError(f"run {run_dir} is a {stored} run (its config.json's loss), not {model}: pass --model {stored} "
                         f"to use it, or a run trained with --model {model}")


def check_outputs_writable(run_dir: Path, out: str | os.PathLike | None = None, *, inference: bool = False) -> None:
    """Raise `atomic.NotWritableError` (a PermissionError with a message) unless this process can write
    what a projection of `run_dir` writes: the run folder itself (thresholds.json) and `out` (default
    run_dir/projections, or run_dir/inference with `inference`). For the scripts to call before any
    long work."""
    atomic.check_writable(run_dir, what="run folder (thresholds.json is stored there)")
    default = Path(run_dir) / ("inference" if inference else "projections")
    atomic.check_writable(Path(out) if out is not None else default, what="output folder")


def check_output_folder(out: str | os.PathLike, *, overwrite: bool = False) -> None:
    """FileExistsError (with what to do) when the output folder `out` exists and is not empty, unless
    `overwrite` (then it is replaced once the new one is complete: `atomic.output_folder`)."""
    out = Path(out)
    if not overwrite and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output folder {out} exists and is not empty: choose another --out, "
                              "or add --overwrite to replace it")


def trained_on(run_dir: Path) -> tuple[str, str] | None:
    """(dataset, category) a run was trained on (its holdout.json), None when it does not say."""
    path = Path(run_dir) / "holdout.json"
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or "dataset" not in stored or "category" not in stored:
        return None
    return stored["dataset"], stored["category"]


def check_run_fits(run_dir: Path, dataset: str, category: str, model: dict | None = None) -> None:
    """Raise ValueError unless the run was trained on dataset/category (and, when `model` is given,
    with those model settings: every key of `model` must equal the run's stored one).

    Called before anything is restored: another category's run would otherwise fail deep inside
    flax (a parameter shape error) or, worse, quietly use the wrong held-out images.
    """
    run_dir = Path(run_dir)
    where = trained_on(run_dir)
    if where is not None and tuple(where) != (dataset, category):
        raise ValueError(f"run {run_dir} was trained on {where[0]}/{where[1]}, not {dataset}/{category}: "
                         f"its model does not fit this data. Pass --category {where[1]}"
                         f"{'' if where[0] == dataset else f' --dataset {where[0]}'} to use it, or a --run trained "
                         f"on {category} (`python train.py --category {category}` trains one)")
    if model:
        stored = model_config(run_dir)
        diff = {k: (stored.get(k), v) for k, v in model.items() if k in stored and stored[k] != v}
        if diff:
            said = ", ".join(f"{k} {a} (wanted {b})" for k, (a, b) in diff.items())
            raise ValueError(f"the model of run {run_dir} does not fit: it has {said}; use a run trained with "
                             "these settings, or train one")


def _check_has_checkpoint(run_dir: Path, category: str, *, explicit: bool) -> None:
    from iepjax import checkpointing
    if checkpointing.complete_steps(run_dir / "checkpoints"):
        return
    pid = holder(run_dir)
    why = (f"it is being trained right now (process {pid}): wait for its first checkpoint" if pid is not None else
           f"its training stopped before the first checkpoint: rerun `python train.py --category {category}` "
           "to continue it")
    older = [f"v{n}" for n in versions(run_dir.parent)
             if f"v{n}" != run_dir.name and checkpointing.complete_steps(run_dir.parent / f"v{n}" / "checkpoints")]
    other = f", or pass --run {older[-1]} (a run with a checkpoint)" if older and not explicit else ""
    raise FileNotFoundError(f"run {run_dir} has no checkpoint yet: {why}{other}")


class CollapsedRun(ValueError):
    """A run whose training.json says its model collapsed to predicting the mean image."""


def read_json(path: Path) -> dict | None:
    """The JSON file at `path` (a run folder's record), None when there is no such file."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def training_record(run_dir: Path) -> dict | None:
    """The run's training.json (written when its training finished), None when it has none yet."""
    path = Path(run_dir) / "training.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # present but unreadable: not finished as far as anyone can tell


def check_trained(run_dir: Path, category: str, *, allow_collapse: bool = False) -> list[str]:
    """Whether a run is fit to project: raise CollapsedRun for a model that collapsed to the mean
    image (its maps are the same for every input and localise nothing), unless `allow_collapse`;
    return warnings (one line each) for a run whose training has not finished.

    A run without training.json has not finished: either a process is training it right now
    (`holder`), or its training stopped early (killed) and `train.py` continues it. Either way
    its newest checkpoint is complete and is projected, with the warning; the thresholds fitted
    for it are stored for that checkpoint's step (`thresholds.load_or_calibrate`), so nothing is
    mixed up with the finished model's. That is a warning, not an error: a look at an unfinished
    model during a long training is useful.
    """
    run_dir = Path(run_dir)
    record = training_record(run_dir)
    collapse = (record or {}).get("collapse") or {}
    if collapse.get("collapsed") and not allow_collapse:
        ratio = collapse.get("ratio")
        likelihood = model_config(run_dir).get("likelihood")
        tries = ("--likelihood gaussian, " if likelihood == "bce" else "") + "more --steps, another --lr or --seed"
        raise CollapsedRun(
            f"the model of run {run_dir} collapsed to predicting the mean image (its reconstruction loss is "
            f"{format(ratio, '.3f') + ' times' if isinstance(ratio, (int, float)) else 'about'} a constant "
            f"predictor's, training.json): its maps localise nothing. Train a new run "
            f"(`python train.py --category {category} --new` with {tries}; docs/calibration.md), "
            "or pass --allow-collapse to project this one anyway")
    if record is not None:
        return []
    from iepjax import checkpointing
    steps = checkpointing.complete_steps(run_dir / "checkpoints")
    total = None
    try:
        total = json.loads((run_dir / "config.json").read_text()).get("steps")
    except (OSError, ValueError):
        pass
    at = f"step {steps[-1] if steps else '?'}" + (f" of {total}" if total else "")
    pid = holder(run_dir)
    if pid is not None:
        return [f"warning: run {run_dir} is being trained right now (process {pid}): projecting its newest "
                f"checkpoint ({at}), not the finished model"]
    return [f"warning: the training of run {run_dir} stopped before the end (no training.json; newest checkpoint "
            f"{at}): `python train.py --category {category}` with the same settings continues it; projecting "
            "that checkpoint"]


def model_config(run_dir: str | os.PathLike) -> dict:
    """The model settings a run was trained with (the "model" entry of its config.json), {} if it has none."""
    return (read_json(Path(run_dir) / "config.json") or {}).get("model", {})


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file and os.replace (no half-written files; `atomic.write_text`)."""
    atomic.write_text(path, text)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and os.replace (`atomic.write_bytes`)."""
    atomic.write_bytes(path, data)
