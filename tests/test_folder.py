"""End to end on a fake MVTec tree: prepare, train a few steps, project, official-protocol outputs.

One module-scoped run of `reproduce.py --data-dir` over two categories (``grid``: gray, texture
preset, tiled; ``widget``: RGB, object preset, resized; odd sizes such as 300x200, two defect kinds
of which one has no masks, test/good without masks; 24 training images, so that the 11 held-out
images fitted thresholds need can be spared). Tiny model (32 px), 2 training steps, 1 projection
step: this checks the plumbing, not the quality. Then project.py on the labelled folder
and on a plain folder (--input-dir), reusing the trained runs (same process: no recompiles).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from iepjax.data import fake_tree

CATS = ("grid", "widget")
N_TRAIN = 24


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    import reproduce

    base = tmp_path_factory.mktemp("e2e")
    src = fake_tree.make_fake_mvtec(base / "src", n_train=N_TRAIN)
    args = ["--data-dir", str(src), "--categories", ",".join(CATS), "--tfds-dir", str(base / "tfds"),
            "--results", str(base / "results"), "--out", str(base / "table"), "--image-size", "32",
            "--steps", "2", "--batch-size", "4", "--proj-steps", "1", "--holdout", "0.2", "--no-progress"]
    rc = reproduce.main(args)
    return {"rc": rc, "base": base, "src": src, "args": args}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_reproduce_runs_both_categories_and_writes_tables(e2e):
    assert e2e["rc"] == 0
    rows = _rows(e2e["base"] / "table" / "results.csv")
    assert [r["category"] for r in rows] == list(CATS)
    assert [r["kind"] for r in rows] == ["texture", "object"]
    for r in rows:
        assert r["status"] == "ok" and r["skipped_pixel_images"] == "2"
        for k in ("recon_pixel_auroc", "grad_pixel_auroc", "grad_image_auroc", "grad_aupro"):
            assert 0.0 <= float(r[k]) <= 1.0
    md = (e2e["base"] / "table" / "results.md").read_text()
    assert "0.892" in md and "0.870" in md and "0.820" in md and "VAE-grad, this run" in md


def test_tiff_maps_at_original_size_and_metrics_file(e2e):
    for row in _rows(e2e["base"] / "table" / "results.csv"):
        cat, proj = row["category"], Path(row["projection_dir"])
        test_files = sorted((e2e["src"] / cat / "test").glob("*/*"))
        assert len(test_files) == 6
        for f in test_files:
            with Image.open(f) as im:
                w, h = im.size
            for r in ("grad", "recon"):
                t = tifffile.imread(proj / "anomaly_maps" / r / cat / "test" / f.parent.name / (f.stem + ".tiff"))
                assert t.dtype == np.float32 and t.shape == (h, w) and np.isfinite(t).all()
        m = json.loads((proj / "metrics.json").read_text())
        for r in ("recon", "grad"):
            for k in ("pixel_auroc", "image_auroc", "pixel_aupro"):
                assert not math.isnan(m[r][k]), (cat, r, k)
        assert sorted(m["protocol"]["skipped_pixel_metrics"]) == ["nomask/000", "nomask/001"]
        assert m["protocol"]["n_pixels"] == sum(
            np.prod(Image.open(f).size) for f in (e2e["src"] / cat / "test").glob("*/*"))
        assert (proj / "index.html").exists() and (proj / "scores.csv").exists()


def test_project_cli_on_the_labelled_folder(e2e, capsys):
    import project

    b = e2e["base"]
    rc = project.main(["--data-dir", str(e2e["src"]), "--category", "widget", "--tfds-dir", str(b / "tfds"),
                       "--results", str(b / "results"), "--steps", "1", "--no-progress", "--no-overlays"])
    out = capsys.readouterr().out
    assert rc == 0 and "original image sizes" in out and "pixel AUROC" in out


def test_project_cli_plain_folder_inference(e2e, tmp_path, capsys):
    import project

    b = e2e["base"]
    inp = tmp_path / "incoming"
    (inp / "line2").mkdir(parents=True)
    for i, f in enumerate(sorted((e2e["src"] / "widget" / "test").glob("*/*"))[:3]):
        Image.open(f).save(inp / ("line2" if i == 0 else "") / f"part{i}.png")
    rc = project.main(["--data-dir", str(e2e["src"]), "--category", "widget", "--input-dir", str(inp),
                       "--out", str(tmp_path / "out"), "--tfds-dir", str(b / "tfds"), "--results", str(b / "results"),
                       "--steps", "1", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rows = _rows(tmp_path / "out" / "scores.csv")
    assert sorted(r["file"] for r in rows) == ["line2/part0.png", "part1.png", "part2.png"]
    for r in rows:
        with Image.open(inp / r["file"]) as im:
            w, h = im.size
        t = tifffile.imread((tmp_path / "out" / "maps" / r["file"]).with_suffix(".tiff"))
        assert t.shape == (h, w) and float(r["image_score"]) == pytest.approx(float(t.max()), rel=1e-4)
        assert (tmp_path / "out" / "overlays" / r["file"]).exists()


def test_project_cli_errors_are_clear(e2e, tmp_path, capsys):
    import project

    b = e2e["base"]
    rc = project.main(["--data-dir", str(e2e["src"]), "--category", "widget", "--input-dir", str(tmp_path / "none"),
                       "--tfds-dir", str(b / "tfds"), "--results", str(b / "results"), "--no-progress"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_project_on_a_folder_without_any_masks(e2e, tmp_path, capsys):
    """Labels but no ground truth at all: image AUROC only, pixel metrics NaN and said so."""
    import shutil

    import project

    b = e2e["base"]
    shutil.copytree(e2e["src"] / "widget", tmp_path / "src" / "widget")
    shutil.rmtree(tmp_path / "src" / "widget" / "ground_truth")
    rc = project.main(["--data-dir", str(tmp_path / "src"), "--category", "widget", "--tfds-dir", str(b / "tfds"),
                       "--results", str(b / "results"), "--steps", "1", "--no-progress", "--no-overlays"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "no ground-truth mask" in captured.err
    proj = Path(captured.out.strip().splitlines()[-1].split("output folder: ")[1])
    m = json.loads((proj / "metrics.json").read_text())
    assert m["grad"]["pixel_auroc"] is None and 0 <= m["grad"]["image_auroc"] <= 1  # strict JSON: NaN -> null
    assert len(m["protocol"]["skipped_pixel_metrics"]) == 4


def test_reproduce_with_the_mvtec_builder(e2e, tmp_path):
    """The mvtec_ad builder pointed at the fake tree ('grid' is an MVTec AD category name)."""
    import reproduce

    b = e2e["base"]
    rc = reproduce.main(["--manual-dir", str(e2e["src"]), "--categories", "grid", "--tfds-dir", str(tmp_path / "tfds"),
                         "--results", str(b / "results"), "--out", str(tmp_path / "table"), "--image-size", "32",
                         "--steps", "2", "--batch-size", "4", "--proj-steps", "1", "--holdout", "0.2",
                         "--no-progress", "--no-overlays"])
    assert rc == 0
    (row,) = _rows(tmp_path / "table" / "results.csv")
    assert row["status"] == "ok" and "/mvtec_ad/grid/" in row["run_dir"]
    assert (Path(row["projection_dir"]) / "anomaly_maps" / "grad" / "grid" / "test" / "good" / "000.tiff").exists()
