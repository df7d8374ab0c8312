"""Run folders: results/<model>/<dataset>/<category>/v<N>/ with a `latest` link.

A run folder holds the resolved config, checkpoints/, train_log.csv, training.json and one
sub-folder per projection run under projections/.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

_VERSION = re.compile(r"^v(\d+)$")


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


def new_run(cat_dir: Path) -> Path:
    """Create the next v<N> folder and point `latest` at it (atomically replaced link)."""
    v = versions(cat_dir)
    run = cat_dir / f"v{(v[-1] + 1) if v else 0}"
    run.mkdir(parents=True)
    set_latest(cat_dir, run)
    return run


def set_latest(cat_dir: Path, run: Path) -> None:
    """Point cat_dir/latest at `run` (relative symlink, swapped in with os.replace)."""
    tmp = cat_dir / ".latest.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(run.name, tmp)
    os.replace(tmp, cat_dir / "latest")


def find_run(root: str | os.PathLike, model: str, dataset: str, category: str, run: str | None = None) -> Path:
    """The run folder to use: `run` (a path or a v<N> name) or the latest; a clear error if missing."""
    cat_dir = category_dir(root, model, dataset, category)
    if run:
        p = Path(run)
        for cand in (p, cat_dir / run):
            if (cand / "checkpoints").is_dir():
                return cand.resolve()
        raise FileNotFoundError(f"run {run!r} not found (looked for {p}/checkpoints and {cat_dir / run}/checkpoints); "
                                f"existing runs: {[f'v{n}' for n in versions(cat_dir)] or 'none'}")
    found = latest_run(cat_dir)
    if found is None or not (found / "checkpoints").is_dir():
        raise FileNotFoundError(f"no trained run for {dataset}/{category} under {cat_dir}: "
                                f"train one first with `python train.py --category {category}`")
    return found


def model_config(run_dir: str | os.PathLike) -> dict:
    """The model settings a run was trained with (the "model" entry of its config.json), {} if it has none."""
    path = Path(run_dir) / "config.json"
    return json.loads(path.read_text()).get("model", {}) if path.exists() else {}


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file and os.replace (no half-written files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
