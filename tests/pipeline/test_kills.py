"""train.py and project.py killed (SIGKILL) at random points: what they wrote is complete or absent,
and a rerun completes.

The reference duration and model of train.py are the suite's tiny run (conftest `tiny_run`, made
once per pytest run); the killed runs read its prepared data. The scripts run as subprocesses in
their own process groups: a kill concerns the whole process.
"""
from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_script, script_folder, tiny_train_args

TIMEOUT = 600
_run = run_script
_folder = script_folder
slow = pytest.mark.slow


def _decode_png(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 16 and img.shape[1] > 16 and img.shape[2] in (3, 4), (path, img.shape)
    return img


KILL_SEED = 11


def _kill_after(args: list[str], env: dict, seconds: float | None = None, *, when=None) -> int | None:
    """Start a script and SIGKILL it (its whole process group) `seconds` after its start, or as soon as
    `when()` holds (polled every 5 ms); its exit status, None when it was killed (a script that ends
    first is left alone)."""
    p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + (seconds if seconds is not None else TIMEOUT)
    while p.poll() is None and time.monotonic() < deadline and not (when is not None and when()):
        time.sleep(0.005)
    if p.poll() is not None:
        return p.returncode
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=TIMEOUT)
    return None


def _kill_points(duration: float, n: int = 2) -> list[float]:
    """n moments spread over a run of `duration` seconds: one drawn (seeded) in each n-th of it, after the
    first 5 % (so that the later ones land in the long work, not only in the interpreter's start)."""
    rng = random.Random(KILL_SEED)
    return [duration * (0.05 + 0.93 * (i + rng.random()) / n) for i in range(n)]


def _strict_json(path: Path):
    return json.loads(path.read_text(), parse_constant=lambda t: (_ for _ in ()).throw(ValueError(t)))


def _check_runs(cat_dir: Path, steps: int) -> None:
    """Whatever a killed train.py left under a category: every file under its final name is whole (its JSON
    parses, strictly; the log parses), `latest` names a run folder, and a run with training.json has
    finished (a checkpoint of the last step; its thresholds, if any, above 0)."""
    from iepjax import checkpointing, runs
    from iepjax.training import LOG_COLUMNS

    if (cat_dir / "latest").is_symlink():
        assert (cat_dir / "latest").resolve().is_dir()
    for n in runs.versions(cat_dir):
        run = cat_dir / f"v{n}"
        for f in run.glob("*.json"):
            _strict_json(f)
        if (run / "train_log.csv").exists():
            with open(run / "train_log.csv", newline="") as f:
                reader = csv.DictReader(f)
                rows = list(reader)
            assert tuple(reader.fieldnames) == LOG_COLUMNS and all(float(r["step"]) > 0 for r in rows)
        if (run / "training.json").exists():
            assert checkpointing.complete_steps(run / "checkpoints")[-1] == steps
        if (run / "thresholds.json").exists():
            t = _strict_json(run / "thresholds.json")
            assert all(t[row]["pixel_threshold"] > 0 and t[row]["image_threshold"] > 0 for row in ("grad", "recon"))


# project.py --no-overlays: no panels and no iteration strip (trajectory.png)
PROJECTION_FILES = ("metrics.json", "thresholds.json", "projection_config.json", "loss_scale.json", "timing.json", "maps.npz",
                    "scores.csv", "index.html", "energy.png", "roc.png")


def _check_projections(parent: Path) -> list[Path]:
    """Every v<N> under a run's projections/ is complete (every file there, each parses) and `latest`
    names one of them; returns them."""
    from iepjax import runs

    done = [parent / f"v{n}" for n in runs.versions(parent)]
    for out in done:
        assert sorted(p.name for p in out.iterdir()) == sorted(PROJECTION_FILES + ("anomaly_maps",)), out
        for name in PROJECTION_FILES:
            if name.endswith(".json"):
                _strict_json(out / name)
        with np.load(out / "maps.npz") as z:
            n = len(z["ids"])
            assert z["grad"].shape[0] == n > 0
        assert len((out / "scores.csv").read_text().splitlines()) == n + 1
        for name in ("energy.png", "roc.png"):
            _decode_png(out / name)
        assert "trajectory.png" not in (out / "index.html").read_text()
        tiffs = sorted((out / "anomaly_maps").rglob("*.tiff"))
        assert len(tiffs) == 2 * n and all(p.stat().st_size > 0 for p in tiffs)
    if (parent / "latest").is_symlink():
        assert (parent / "latest").resolve() in {p.resolve() for p in done}
    return done


@slow
def test_train_and_project_killed_at_random_points_leave_a_complete_result_or_none(tiny_run, env, tmp_path):
    """SIGKILL at two seeded moments spread over a run of train.py (its duration measured from an
    uninterrupted run: the suite's tiny run, conftest), and of project.py, plus once while project.py
    writes its output folder: what each wrote is complete or absent; a rerun then completes (train.py
    resumes its run folder and trains the uninterrupted run's model, project.py writes a new complete
    folder and removes the leftover).

    Before, a kill during project.py left 0-byte TIFFs, an early metrics.json or a `latest` link to an
    incomplete folder.
    """
    import shutil

    from iepjax import atomic, checkpointing, training

    tfds = tiny_run["tfds"]  # prepared: the kills land in the scripts' own work

    def train(results: Path) -> list[str]:
        return tiny_train_args(results, tfds)  # the tiny run's arguments: the same model

    def project(results: Path) -> list[str]:
        return ["project.py", "--category", "brick", "--tfds-dir", str(tfds), "--results", str(results), "--no-progress",
                "--steps", "2", "--allow-collapse", "--no-overlays"]

    duration = tiny_run["train_s"]
    results = tmp_path / "killed"
    cat = results / "vae" / "textures" / "brick"
    for at in _kill_points(duration):
        _kill_after(train(results), env, at)
        _check_runs(cat, 4)
    again = _run(train(results), env)
    assert again.returncode == 0, again.stderr[-3000:]
    run = _folder(again.stdout, "run folder")
    assert run == cat / "v0" and _runs_in(cat) == ["v0"]  # the killed runs' folder, resumed
    _check_runs(cat, 4)
    assert (run / "training.json").exists() and (run / "thresholds.json").exists()
    assert not checkpointing.stale_tmp(run / "checkpoints")
    ref_run = tiny_run["run_dir"]
    assert (run / "train_log.csv").read_text() == (ref_run / "train_log.csv").read_text()
    import jax
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(training.load_params(run)[0]),
                                                    jax.tree.leaves(training.load_params(ref_run)[0])))

    shutil.copytree(results, tmp_path / "ref_projection", symlinks=True)
    stored = (tmp_path / "ref_projection" / run.relative_to(results) / "thresholds.json").read_text()
    t0 = time.monotonic()
    ref = _run(project(tmp_path / "ref_projection"), env)
    duration = time.monotonic() - t0
    assert ref.returncode == 0, ref.stderr[-3000:]
    # the same steps as train.py's --proj-steps: project.py reads its thresholds back, fits none
    assert (tmp_path / "ref_projection" / run.relative_to(results) / "thresholds.json").read_text() == stored
    timing = json.loads((_folder(ref.stdout, "output folder") / "metrics.json").read_text())["timing"]
    assert "compiled_in" not in timing, timing  # "threshold calibration" when it fits them
    parent = run / "projections"
    for at in _kill_points(duration):
        _kill_after(project(results), env, at)
        _check_projections(parent)

    def metrics_written() -> bool:  # the early metrics.json that used to look like a finished projection
        return parent.is_dir() and any(atomic.is_partial(p.name) and (p / "metrics.json").exists()
                                       for p in parent.iterdir())

    assert _kill_after(project(results), env, when=metrics_written) is None, "project.py ended before the kill"
    _check_projections(parent)
    assert [p for p in parent.iterdir() if atomic.is_partial(p.name)], "its output is a temporary folder, no v<N>"
    final = _run(project(results), env)
    assert final.returncode == 0, final.stderr[-3000:]
    out = _folder(final.stdout, "output folder")
    assert out in _check_projections(parent) and (parent / "latest").resolve() == out.resolve()
    assert not [p for p in parent.iterdir() if atomic.is_partial(p.name)], "leftovers removed"
    assert "incomplete output of an interrupted run" in final.stderr


def _runs_in(cat_dir: Path) -> list[str]:
    """The run folders v<N> of a category, by name."""
    from iepjax import runs
    return [f"v{n}" for n in runs.versions(cat_dir)]
