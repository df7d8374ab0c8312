"""End to end on a fake MVTec tree: prepare, train a few steps, project, official-protocol outputs.

One module-scoped run of `reproduce.py --data-dir` over two categories (``grid``: gray 16-bit
PNGs of 12-bit values, texture preset, tiled; ``widget``: RGB, object preset, resized; odd sizes
such as 300x200, two defect kinds of which one has no masks, test/good without masks; 24 training images, so that the 11 held-out
images fitted thresholds need can be spared). Tiny model (32 px), 2 training steps, 1 projection
step: this checks the plumbing, not the quality. Then project.py on the labelled folder and on a
plain folder (--input-dir), reusing the trained runs (same process: no recompiles); the runs are
barely trained and may count as collapsed, so project.py gets --allow-collapse.
"""
from __future__ import annotations

import csv
import json
import math
import re
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
    src = fake_tree.make_fake_mvtec(base / "src", n_train=N_TRAIN, gray_bits=16)
    args = ["--data-dir", str(src), "--categories", ",".join(CATS), "--tfds-dir", str(base / "tfds"),
            "--results", str(base / "results"), "--out", str(base / "table"), "--image-size", "32",
            "--steps", "2", "--batch-size", "4", "--proj-steps", "1", "--holdout", "0.2", "--no-progress",
            "--models", "vae"]
    rc = reproduce.main(args)
    return {"rc": rc, "base": base, "src": src, "args": args}


def _no_constant(token):
    raise ValueError(f"not strict JSON: {token}")


def _strict(path: Path):
    """The JSON file at `path`, refusing NaN / Infinity (not JSON, RFC 8259)."""
    return json.loads(Path(path).read_text(), parse_constant=_no_constant)


def _partials(folder: Path) -> list[Path]:
    """Temporary output folders (`iepjax.atomic`) left in `folder`."""
    from iepjax import atomic
    return [p for p in folder.iterdir() if atomic.is_partial(p.name)]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_reproduce_runs_both_categories_and_writes_tables(e2e):
    assert e2e["rc"] == 0
    meta = (e2e["base"] / "table" / "meta.json").read_text()
    assert json.loads(meta, parse_constant=_no_constant)["categories"] == list(CATS)
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
                       "--results", str(b / "results"), "--steps", "1", "--no-progress", "--no-overlays",
                       "--allow-collapse"])
    out = capsys.readouterr().out
    assert rc == 0 and "original image sizes" in out and "pixel AUROC" in out


def _infer(e2e, inp: Path, *extra: str) -> list[str]:
    b = e2e["base"]
    return ["--data-dir", str(e2e["src"]), "--category", "widget", "--input-dir", str(inp), "--tfds-dir",
            str(b / "tfds"), "--results", str(b / "results"), "--steps", "1", "--no-progress", "--allow-collapse",
            *extra]


def _good_images(e2e, inp: Path) -> dict[str, Path]:
    """Readable inputs: one in a sub-folder, and x.png / x.jpg, two files that differ only by extension."""
    src = sorted((e2e["src"] / "widget" / "test").glob("*/*"))
    (inp / "line2").mkdir(parents=True)
    made = {"line2/part0.png": src[0], "part1.png": src[1], "part1.jpg": src[4]}  # three different test images
    for rel, f in made.items():
        Image.open(f).convert("RGB").save(inp / rel)
    return made


def test_project_cli_plain_folder_inference(e2e, tmp_path, capsys):
    import project
    from iepjax.calibrated_maps import image_score
    from iepjax.config import default_map

    inp = tmp_path / "incoming"
    _good_images(e2e, inp)
    rc = project.main(_infer(e2e, inp, "--out", str(tmp_path / "out")))
    assert rc == 0, capsys.readouterr().err
    out = tmp_path / "out"
    rows = _rows(out / "scores.csv")
    assert sorted(r["file"] for r in rows) == ["line2/part0.png", "part1.jpg", "part1.png"]
    for r in rows:
        with Image.open(inp / r["file"]) as im:
            w, h = im.size
        t = tifffile.imread(out / "maps" / (r["file"] + ".tiff"))  # the whole name kept: x.png -> x.png.tiff
        assert t.shape == (h, w) and float(r["image_score"]) == pytest.approx(image_score(t, default_map()), rel=1e-4)
        assert (out / "overlays" / (r["file"] + ".png")).exists()
    # part1.png and part1.jpg are different images: two maps, neither overwritten
    a, b = (tifffile.imread(out / "maps" / f"part1.{e}.tiff") for e in ("png", "jpg"))
    assert not np.array_equal(a, b)
    assert _rows(out / "errors.csv") == []
    summary = _strict(out / "summary.json")
    assert summary["n_images"] == 3 and summary["n_failed"] == 0 and summary["failed"] == []
    assert not _partials(tmp_path), "no temporary folder left"


def _bad_images(inp: Path, good: Path) -> dict[str, str]:
    """Unreadable image files next to good ones, and what the error says about each."""
    data = good.read_bytes()
    (inp / "cut.png").write_bytes(data[: len(data) // 2])  # truncated
    (inp / "empty.png").write_bytes(b"")
    (inp / "notes.jpg").write_text("not an image")
    (inp / "deep").mkdir()
    Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(inp / "deep" / "sixteen.png")
    return {"cut.png": "cannot read image", "deep/sixteen.png": "more than 8 bits", "empty.png": "cannot read image",
            "notes.jpg": "cannot read image"}


def test_folder_inference_processes_every_readable_image_and_names_the_others(e2e, tmp_path, capsys):
    """Truncated, empty, 16-bit and non-image files among good ones: every good image gets its map, score
    and overlay, every bad file is named on stderr and in errors.csv, and the exit status (4) says that
    some failed. The default output folder is <run>/inference/v<N>, complete, with `latest` on it."""
    import project

    inp = tmp_path / "incoming"
    good = _good_images(e2e, inp)
    bad = _bad_images(inp, inp / "part1.png")
    rc = project.main(_infer(e2e, inp))
    captured = capsys.readouterr()
    assert rc == 4, captured.err
    assert "Traceback" not in captured.err
    for rel, says in bad.items():
        line = next((x for x in captured.err.splitlines() if str(inp / rel) in x), None)
        assert line is not None and says in line, (rel, captured.err)
    assert "4 of 7 image files could not be read" in captured.err
    out = Path(re.search(r"^output folder: (.+?) \(", captured.out, flags=re.M).group(1))
    assert out.parent.name == "inference" and re.fullmatch(r"v\d+", out.name)
    assert (out.parent / "latest").resolve() == out.resolve()
    assert sorted(r["file"] for r in _rows(out / "scores.csv")) == sorted(good)
    errors = _rows(out / "errors.csv")
    assert [r["file"] for r in errors] == sorted(bad)
    assert all(says in r["error"] for r, says in zip(errors, [bad[k] for k in sorted(bad)]))
    for rel in good:
        assert (out / "maps" / (rel + ".tiff")).is_file() and (out / "overlays" / (rel + ".png")).is_file()
    summary = _strict(out / "summary.json")
    assert summary["n_images"] == 3 and summary["n_failed"] == 4 and summary["failed"] == sorted(bad)


def test_folder_inference_with_no_readable_image_is_an_error_before_any_work(e2e, tmp_path, capsys):
    import project

    inp = tmp_path / "incoming"
    inp.mkdir()
    (inp / "a.png").write_bytes(b"")
    (inp / "b.jpg").write_text("text")
    inference = Path(e2e["base"] / "results" / "vae" / "folder" / "widget" / "latest").resolve() / "inference"
    before = sorted(p.name for p in inference.iterdir()) if inference.exists() else []
    rc = project.main(_infer(e2e, inp))
    err = capsys.readouterr().err
    assert rc == 2 and "none of the 2 image files" in err and "Traceback" not in err, err
    assert (sorted(p.name for p in inference.iterdir()) if inference.exists() else []) == before


def test_folder_inference_into_an_existing_out_folder(e2e, tmp_path, capsys):
    """--out that holds files is refused before any work unless --overwrite, which replaces it whole."""
    import project

    inp = tmp_path / "incoming"
    _good_images(e2e, inp)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    rc = project.main(_infer(e2e, inp, "--out", str(out)))
    err = capsys.readouterr().err
    assert rc == 2 and "--overwrite" in err and (out / "mine.txt").read_text() == "keep", err
    rc = project.main(_infer(e2e, inp, "--out", str(out), "--overwrite", "--no-overlays"))
    assert rc == 0, capsys.readouterr().err
    assert not (out / "mine.txt").exists() and len(_rows(out / "scores.csv")) == 3
    assert not _partials(tmp_path)


def test_a_gray_category_of_16_bit_images_is_read_through_its_training_images_window(e2e, tmp_path, capsys):
    """grid's files hold 12-bit values in 16-bit PNGs: its run records the intensity window of its
    training images (their value quantiles, far inside 0..65535); project.py --input-dir reads a
    16-bit file through it (the map equals the labelled projection's map of the same file) and
    refuses an 8-bit copy of it, naming the file (one bit depth per category)."""
    import project
    from iepjax.data.layout import WINDOW_QUANTILES, to_uint8

    b = e2e["base"]
    run = b / "results" / "vae" / "folder" / "grid" / "latest"
    prep = _strict(run / "preprocess.json")
    values = np.concatenate([np.asarray(Image.open(f), np.float64).ravel()
                             for f in sorted((e2e["src"] / "grid" / "train" / "good").glob("*.png"))])
    assert prep["intensity_window"] == pytest.approx(list(np.quantile(values, WINDOW_QUANTILES)))
    assert 0 < prep["intensity_window"][0] < prep["intensity_window"][1] < 4096
    inp = tmp_path / "scans"
    inp.mkdir()
    deep = e2e["src"] / "grid" / "test" / "blob" / "000.png"
    (inp / "deep.png").write_bytes(deep.read_bytes())
    Image.fromarray(to_uint8(np.asarray(Image.open(deep), np.float64), prep["intensity_window"])).save(inp / "eight.png")
    rc = project.main(["--data-dir", str(e2e["src"]), "--category", "grid", "--input-dir", str(inp), "--tfds-dir",
                       str(b / "tfds"), "--results", str(b / "results"), "--steps", "1", "--no-progress",
                       "--no-overlays", "--allow-collapse", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 4 and f"{inp / 'eight.png'} has 8 bits per pixel" in err, err
    got = tifffile.imread(tmp_path / "out" / "maps" / "deep.png.tiff")
    labelled = tifffile.imread(run / "projections" / "latest" / "anomaly_maps" / "grad" / "grid" / "test" / "blob"
                               / "000.tiff")
    np.testing.assert_allclose(got, labelled, atol=1e-5)


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
                       "--results", str(b / "results"), "--steps", "1", "--no-progress", "--no-overlays",
                       "--allow-collapse"])
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
                         "--no-progress", "--no-overlays", "--models", "vae"])
    assert rc == 0
    (row,) = _rows(tmp_path / "table" / "results.csv")
    assert row["status"] == "ok" and "/mvtec_ad/grid/" in row["run_dir"]
    assert (Path(row["projection_dir"]) / "anomaly_maps" / "grad" / "grid" / "test" / "good" / "000.tiff").exists()
