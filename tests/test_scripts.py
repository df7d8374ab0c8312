"""End to end: `train.py` then `project.py` as subprocesses on the built-in textures data, tiny settings.

The built-in brick images are 128x128; `--size 32` exercises the resizing to the model size.
The subprocesses share the suite's persistent compilation cache (conftest), which makes the
second and later runs of this module several times faster.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 600
# The three end-to-end tests share one train/project/retrain sequence: ~90-110 s on the loaded 2-core
# machine (45 s of it project.py drawing 48 overlay panels). Deselect them with -m "not slow".
slow = pytest.mark.slow


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)


def _main(script: str, argv: list[str], capsys) -> tuple[int, str]:
    """Run `script`'s main(argv) in this process (cheap: no interpreter start); (exit code, stderr)."""
    spec = importlib.util.spec_from_file_location(f"_script_{script[:-3]}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        code = module.main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    return code, capsys.readouterr().err


def _folder(out: str, label: str) -> Path:
    m = re.search(rf"^{label}: (.+?)(?: \(.*\))?$", out, flags=re.M)
    assert m, f"no '{label}:' line in the output:\n{out}"
    return Path(m.group(1).strip())


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def env(jax_cache_env):
    e = dict(os.environ, **jax_cache_env)
    e.pop("IEPJAX_DATA_DIR", None)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return e


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, env):
    tmp = tmp_path_factory.mktemp("e2e")
    common = ["--category", "brick", "--results", str(tmp / "results"), "--tfds-dir", str(tmp / "tfds"), "--no-progress"]
    train_args = ["train.py", *common, "--size", "32", "--steps", "4", "--batch-size", "4", "--allow-collapse"]
    train = _run(train_args, env)
    assert train.returncode == 0, train.stderr[-3000:]
    run_dir = _folder(train.stdout, "run folder")
    before = _snapshot(run_dir / "checkpoints"), (run_dir / "train_log.csv").read_text()
    project = _run(["project.py", *common, "--steps", "2"], env)
    assert project.returncode == 0, project.stderr[-3000:]
    again = _run(train_args, env)
    return dict(tmp=tmp, train=train, project=project, again=again, run_dir=run_dir, before=before)


@slow
def test_train_writes_a_run_folder(e2e):
    run_dir = e2e["run_dir"]
    assert run_dir.is_dir() and run_dir.is_relative_to(e2e["tmp"] / "results")
    assert (run_dir / "checkpoints").is_dir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["size"] == 32 and config["model"]["channels"] == 1 and config["steps"] == 4
    assert json.loads((run_dir / "training.json").read_text())["steps"] == 4
    assert json.loads((run_dir / "holdout.json").read_text())["ids"]


@slow
def test_project_writes_metrics_maps_and_overlays(e2e):
    out_dir = _folder(e2e["project"].stdout, "output folder")
    assert out_dir.is_dir() and out_dir.is_relative_to(e2e["run_dir"])
    metrics = json.loads((out_dir / "metrics.json").read_text())
    for row in ("recon", "grad"):
        assert {"pixel_auroc", "image_auroc", "pixel_aupro"} <= set(metrics[row]), metrics[row]
        for key in ("pixel_auroc", "image_auroc", "pixel_aupro"):
            assert 0.0 <= metrics[row][key] <= 1.0
    with np.load(out_dir / "maps.npz") as maps:
        grad, recon, ids = maps["grad"], maps["recon"], maps["ids"]
    assert grad.ndim == 3 and grad.shape == recon.shape and len(ids) == len(grad) > 0
    assert np.all(np.isfinite(grad)) and grad.min() >= 0 and grad.max() > 0
    pngs = sorted((out_dir / "overlays").glob("*.png"))
    assert len(pngs) == len(ids)
    import matplotlib.image as mpimg
    for png in pngs[:3]:
        img = mpimg.imread(png)
        assert img.ndim == 3 and img.shape[0] > 32 and img.shape[1] > 32


@slow
def test_rerunning_train_resumes_the_finished_run(e2e):
    again = e2e["again"]
    assert again.returncode == 0, again.stderr[-3000:]
    run_dir = e2e["run_dir"]
    assert _folder(again.stdout, "run folder") == run_dir
    ckpt_before, log_before = e2e["before"]
    assert _snapshot(run_dir / "checkpoints") == ckpt_before, "no step was retrained: no checkpoint rewritten"
    assert (run_dir / "train_log.csv").read_text() == log_before
    assert json.loads((run_dir / "training.json").read_text())["steps"] == 4


# The failure cases run main() in-process: they stop before any JAX work, and a subprocess would
# only add ~4 s of interpreter start and imports each.

def test_project_unknown_category_fails_clearly(tmp_path, capsys):
    code, err = _main("project.py", ["--category", "nope", "--results", str(tmp_path), "--no-progress"], capsys)
    assert code not in (0, None)
    assert "nope" in err and "brick" in err, err  # names the valid categories


def test_project_without_a_trained_run_says_to_train(tmp_path, capsys):
    code, err = _main("project.py", ["--category", "brick", "--results", str(tmp_path / "empty"),
                                     "--tfds-dir", str(tmp_path / "tfds"), "--no-progress"], capsys)
    assert code not in (0, None)
    assert "train.py" in err and "brick" in err, err
    assert not (tmp_path / "tfds").exists()  # failed before touching the data


def test_train_unknown_category_fails_clearly(tmp_path, capsys):
    code, err = _main("train.py", ["--category", "nope", "--results", str(tmp_path / "results"),
                                   "--tfds-dir", str(tmp_path / "tfds"), "--no-progress"], capsys)
    assert code not in (0, None)
    assert "nope" in err and "brick" in err, err
    assert not (tmp_path / "results").exists() and not (tmp_path / "tfds").exists()
