"""End to end: `train.py` then `project.py` as subprocesses on the built-in textures data, tiny settings.

The built-in brick images are 128x128; `--size 32` exercises the resizing to the model size.
The run and its projection are the suite's tiny run (conftest `tiny_run`, made once per pytest run
and shared with test_export.py); the tests here read it, or copy it before running a script on it.
The subprocesses share the suite's persistent compilation cache (conftest).
"""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

from conftest import TINY_PROJECT, copy_results, run_script, script_folder, tiny_train_args

ROOT = Path(__file__).resolve().parents[2]
# The end-to-end tests: the tiny run, a rerun of train.py on a copy of it, a diverged run (the kills:
# test_kills.py). Deselect them with -m "not slow".
slow = pytest.mark.slow


_run = run_script  # conftest: a script end to end from the repository root


def _load(path: Path):
    """The Python file at `path` as a module (the scripts and tools are not importable by name)."""
    spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _main(script: str, argv: list[str], capsys) -> tuple[int, str]:
    """Run `script`'s main(argv) in this process (cheap: no interpreter start); (exit code, stderr)."""
    module = _load(ROOT / script)
    try:
        code = module.main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    return code, capsys.readouterr().err


_folder = script_folder  # conftest: the folder a script printed on its "<label>: <path>" line


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}




@pytest.fixture(scope="module")
def e2e(tmp_path_factory, env, tiny_run):
    """The suite's tiny run (conftest: train.py, then project.py), and train.py run again on a copy of it
    with only the test-time tiling changed (the same run: resumed, thresholds fitted again)."""
    tmp = tmp_path_factory.mktemp("e2e")
    results, run_dir = copy_results(tiny_run, tmp / "results")
    before = _snapshot(run_dir / "checkpoints"), (run_dir / "train_log.csv").read_text()
    nce_results, _ = copy_results(tiny_run, tmp / "nce")
    nce = _run(["project.py", *TINY_PROJECT, "--results", str(nce_results), "--tfds-dir", str(tiny_run["tfds"]),
                "--map", "nce", "--image-score", "area", "--no-overlays"], env)
    again = _run(tiny_train_args(results, tiny_run["tfds"], "--tile-stride", "32"), env)
    return dict(tmp=tmp, results=tiny_run["results"], tfds=tiny_run["tfds"], train_out=tiny_run["train_stdout"],
                project_out=tiny_run["project_stdout"], run_dir=tiny_run["run_dir"], again=again, nce=nce,
                again_results=results, again_run_dir=run_dir, before=before)


@slow
def test_train_writes_a_run_folder(e2e):
    run_dir = e2e["run_dir"]
    assert run_dir.is_dir() and run_dir.is_relative_to(e2e["results"])
    assert (run_dir / "checkpoints").is_dir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["size"] == 32 and config["model"]["channels"] == 1 and config["steps"] == 4
    assert json.loads((run_dir / "training.json").read_text())["steps"] == 4
    assert json.loads((run_dir / "holdout.json").read_text())["ids"]


@slow
def test_project_writes_metrics_maps_and_overlays(e2e):
    out_dir = _folder(e2e["project_out"], "output folder")
    assert out_dir.is_dir() and out_dir.is_relative_to(e2e["run_dir"])
    metrics = json.loads((out_dir / "metrics.json").read_text())
    for row in ("recon", "grad"):
        assert {"pixel_auroc", "image_auroc", "pixel_aupro"} <= set(metrics[row]), metrics[row]
        for key in ("pixel_auroc", "image_auroc", "pixel_aupro"):
            assert 0.0 <= metrics[row][key] <= 1.0
    # the default image score, named on the console with the paper's maximum beside it
    assert metrics["map"] == {"kind": "paper", "image_score": "topk", "topk_frac": 0.001}
    assert (f"image score: mean of the top 0.1 % map pixels (image AUROC of the max: recon "
            f"{metrics['recon']['image_auroc_max']:.4f}, grad {metrics['grad']['image_auroc_max']:.4f})") in e2e["project_out"]
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
def test_project_with_the_normal_calibrated_map(e2e):
    """--map nce: the tables are fitted on the held-out normal images and stored with the thresholds,
    the projection runs unsmoothed, the maps are -log10 tail probabilities, image scores the chosen one."""
    nce = e2e["nce"]
    assert nce.returncode == 0, nce.stderr[-3000:]
    out_dir = _folder(nce.stdout, "output folder")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["map"] == {"kind": "nce", "image_score": "area"}
    assert "image score: share of pixels above the pixel threshold (image AUROC of the max" in nce.stdout
    assert "area" in metrics["protocol"]["image_auroc"]
    for row in ("recon", "grad"):
        assert 0.0 <= metrics[row]["image_auroc_max"] <= 1.0 and 0.0 <= metrics[row]["pixel_auroc"] <= 1.0
    stored = json.loads((out_dir / "thresholds.json").read_text())
    assert stored["projection"]["smoothing_sigma"] == 0.0
    assert stored["map"]["kind"] == "nce" and stored["grad"]["map_fit"]["tail_qs"]  # the tables, with the thresholds
    with np.load(out_dir / "maps.npz") as maps:
        grad = maps["grad"]
    assert np.all(np.isfinite(grad)) and grad.min() >= 0.0
    # 0 < image threshold (an area: a fraction of the pixels) <= 1
    assert 0.0 < stored["grad"]["image_threshold"] <= 1.0


@slow
def test_rerunning_train_resumes_the_finished_run(e2e):
    again = e2e["again"]
    assert again.returncode == 0, again.stderr[-3000:]
    run_dir = e2e["again_run_dir"]
    assert _folder(again.stdout, "run folder") == run_dir
    ckpt_before, log_before = e2e["before"]
    assert _snapshot(run_dir / "checkpoints") == ckpt_before, "no step was retrained: no checkpoint rewritten"
    assert (run_dir / "train_log.csv").read_text() == log_before
    assert json.loads((run_dir / "training.json").read_text())["steps"] == 4
    # --tile-stride 32 (= the size: no overlap) was stored, and the thresholds fitted again with it
    assert json.loads((run_dir / "preprocess.json").read_text())["tile_stride"] == 0
    assert json.loads((run_dir / "thresholds.json").read_text())["preprocess"]["tile_stride"] == 0
    assert json.loads((run_dir / "thresholds.json").read_text())["projection"]["steps"] == 2  # train.py --proj-steps
    # the 128 px crops' working scale, fixed for every image: 32 / 0.5 = 64 px
    assert json.loads((run_dir / "preprocess.json").read_text())["pixel_scale"] == 0.5


@slow
def test_train_reports_a_diverged_run_as_an_error(e2e, env, tmp_path):
    """train.py reports a divergence as an error that says what to change (status 1), not a traceback."""
    r = _run(["train.py", "--category", "brick", "--results", str(tmp_path / "results"), "--tfds-dir",
              str(e2e["tfds"]), "--no-progress", "--size", "32", "--steps", "3", "--batch-size", "4",
              "--lr", "1e4"], env)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "error: training diverged at step 3" in r.stderr and "lower the learning rate" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr


class _Refs(HTMLParser):
    """Every src= and href= value of an HTML page."""

    def __init__(self):
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def _decode_png(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 16 and img.shape[1] > 16 and img.shape[2] in (3, 4), (path, img.shape)
    return img


@slow
def test_every_output_of_a_run_and_a_projection_exists_and_is_well_formed(e2e):
    """All files of a run and of a projection exist and are well formed."""
    from iepjax import metrics as M
    from iepjax.report import SCORE_COLUMNS
    from iepjax.training import LOG_COLUMNS

    run_dir = e2e["run_dir"]
    # --- the run folder: results/vae/<dataset>/<category>/v<N>/ and its `latest` link
    cat_dir = e2e["results"] / "vae" / "textures" / "brick"
    assert re.fullmatch(r"v\d+", run_dir.name) and run_dir.parent.resolve() == cat_dir.resolve()
    assert (cat_dir / "latest").is_symlink() and (cat_dir / "latest").resolve() == run_dir.resolve()
    config = json.loads((run_dir / "config.json").read_text())
    assert {"model", "steps", "batch_size", "learning_rate", "seed"} <= set(config), sorted(config)
    ckpts = run_dir / "checkpoints"
    assert ckpts.is_dir() and any(p.is_file() for p in ckpts.rglob("*"))
    with open(run_dir / "train_log.csv", newline="") as f:
        reader = csv.DictReader(f)
        log = list(reader)
    assert tuple(reader.fieldnames) == LOG_COLUMNS and {"step", "loss", "recon", "kl"} <= set(LOG_COLUMNS)
    assert len(log) >= 1 and int(log[-1]["step"]) == 4
    assert all(np.isfinite(float(r[c])) for r in log for c in LOG_COLUMNS), log
    thresholds = json.loads((run_dir / "thresholds.json").read_text())
    holdout = json.loads((run_dir / "holdout.json").read_text())
    assert thresholds["checkpoint_step"] == 4  # fitted for the model of that checkpoint
    assert holdout["ids"] and all(isinstance(i, str) for i in holdout["ids"])
    assert thresholds["pixel_quantile"] == 0.995 and thresholds["image_quantile"] == 0.99  # how they were chosen
    assert thresholds["n_images"] == len(holdout["ids"]) and "projection" in thresholds
    # the map's smoothing keeps its share of the input: 1 px at the preset's 64 px, 0.5 px at --size 32
    assert thresholds["projection"]["smoothing_sigma"] == 0.5
    for row in ("recon", "grad"):
        st = thresholds[row]
        assert np.isfinite(st["pixel_threshold"]) and np.isfinite(st["image_threshold"])
        assert st["pixel_quantile"] == 0.995 and st["image_quantile"] == 0.99
        assert st["n_images"] + st["n_excluded"] == len(holdout["ids"]) >= 11 and st["n_images"] >= 10
        assert st["vmax"] >= st["pixel_threshold"]

    # --- the projection folder <run>/projections/p<N>/
    out = e2e["project_out"]
    out_dir = _folder(out, "output folder")
    assert out_dir.is_dir() and out_dir.resolve().parent == (run_dir / "projections").resolve()
    result = json.loads((out_dir / "metrics.json").read_text())
    for row in ("recon", "grad"):
        r = result[row]
        for key in ("pixel_auroc", "image_auroc", "pixel_aupro", "pixel_f1", "image_f1"):
            assert 0.0 <= r[key] <= 1.0, (row, key, r)
    kinds = {line.split(",")[1] for line in (out_dir / "scores.csv").read_text().splitlines()[1:]} - {"good"}
    assert set(result["per_kind"]) == kinds and kinds, result.get("per_kind")  # one entry per defect kind
    for kind, k in result["per_kind"].items():
        assert k["n_images"] >= 1 and all(0.0 <= k[row]["pixel_auroc"] <= 1.0 for row in ("recon", "grad")), kind
    assert "By defect kind" in (out_dir / "index.html").read_text()
    # F1 "at the stored threshold": the thresholds fitted on the held-out normal images for this projection's
    # settings, kept in the projection folder (the run's thresholds.json holds those train.py fitted for the
    # preset's settings)
    used = json.loads((out_dir / "thresholds.json").read_text())
    assert used["projection"] == json.loads((out_dir / "projection_config.json").read_text())
    assert used["projection"]["steps"] == 3 and used["source"] == "held-out normal training images"
    assert used["projection"]["smoothing_sigma"] == 0.5
    for row in ("recon", "grad"):
        assert used[row]["n_images"] + used[row]["n_excluded"] == len(holdout["ids"])
        assert used[row]["pixel_quantile"] == 0.995
        assert result[row]["pixel_threshold"] == used[row]["pixel_threshold"], row
        assert result[row]["image_threshold"] == used[row]["image_threshold"], row
        if thresholds["projection"] == used["projection"]:
            assert thresholds[row] == used[row]
    assert result["thresholds"]["source"] == "held-out normal training images"
    # alpha and lam: the preset's step and hold resolved on the held-out images, recorded in the run
    # folder (train.py resolved them for its threshold fit) and in the projection folder
    from iepjax import presets
    pre = presets.projection_config("textures", "brick")
    scale = json.loads((run_dir / "loss_scale.json").read_text())
    assert (scale["step"], scale["hold"]) == (pre.step, pre.hold) and scale["checkpoint_step"] == 4
    assert scale["n_images"] == len(holdout["ids"]) and scale["alpha"] > 0 and scale["lam"] > 0
    assert (thresholds["projection"]["alpha"], thresholds["projection"]["lam"]) == (scale["alpha"], scale["lam"])
    assert thresholds["projection"]["step"] is None and thresholds["projection"]["hold"] is None
    used_scale = json.loads((out_dir / "loss_scale.json").read_text())
    assert (used["projection"]["alpha"], used["projection"]["lam"]) == (used_scale["alpha"], used_scale["lam"])
    assert result["thresholds"]["n_normal_images"] == used["grad"]["n_images"]
    assert result["thresholds"]["pixel_quantile"] == 0.995 and result["thresholds"]["image_quantile"] == 0.99

    with np.load(out_dir / "maps.npz") as z:
        grad, recon, ids, energies = z["grad"], z["recon"], list(z["ids"]), z["energies"]
    n = len(ids)
    assert n > 0 and grad.shape == recon.shape == (n, 32, 32)
    assert grad.dtype.kind == recon.dtype.kind == "f" and np.isfinite(grad).all() and np.isfinite(recon).all()
    assert energies.shape == (n, 3) and np.isfinite(energies).all()  # one energy per step

    with open(out_dir / "scores.csv", newline="") as f:
        reader = csv.DictReader(f)
        scores = list(reader)
    assert tuple(reader.fieldnames) == SCORE_COLUMNS == ("file", "defect_type", "image_score", "label", "pred_label")
    assert [r["file"] for r in scores] == ids  # one row per test image, in order
    labels = np.array([int(r["label"]) for r in scores])
    assert set(labels) == {0, 1} and all(r["defect_type"] for r in scores)
    assert all((r["defect_type"] == "good") == (r["label"] == "0") for r in scores)
    img_scores = grad.max(axis=(1, 2))
    np.testing.assert_allclose([float(r["image_score"]) for r in scores], img_scores, rtol=1e-5)
    g_t = result["grad"]["image_threshold"]
    assert [int(r["pred_label"]) for r in scores] == [int(s >= g_t) for s in img_scores]
    for row, maps in (("grad", grad), ("recon", recon)):  # image F1 at the stored threshold, recomputed
        assert result[row]["image_f1"] == pytest.approx(
            M.f1_at_threshold(maps.max(axis=(1, 2)), labels, result[row]["image_threshold"]))

    pngs = sorted((out_dir / "overlays").glob("*.png"))
    assert sorted(p.name for p in pngs) == sorted(i.replace("/", "_") + ".png" for i in ids)
    for png in pngs:
        _decode_png(png)
    for name in ("energy.png", "roc.png", "trajectory.png"):
        _decode_png(out_dir / name)

    page = (out_dir / "index.html").read_text()
    parser = _Refs()
    parser.feed(page)
    local = [u for u in parser.refs if not re.match(r"^([a-z]+:|#|//)", u)]
    for name in ("energy.png", "roc.png", "trajectory.png"):
        assert name in local, (name, local)
    assert any(u.startswith("overlays/") for u in local)  # best / worst cases
    missing = [u for u in local if not (out_dir / unquote(u.split("#")[0].split("?")[0])).is_file()]
    assert not missing, missing
    assert "AU-PRO" in page and result["thresholds"]["source"] in page  # the table and how thresholds were chosen

    # compile time reported apart from the steady-state throughput
    m = re.search(r"^compile ([\d.]+) s( \(during threshold calibration\))?, total ([\d.]+) s, "
                  r"steady state (\S+) img/s$", out, flags=re.M)
    assert m, out
    compile_s, total_s, steady = float(m.group(1)), float(m.group(3)), m.group(4)
    # project.py fits thresholds first here (other projection settings than train.py's): that pass
    # compiles the projection, and its compile time is the one reported
    assert m.group(2) and result["timing"]["compiled_in"] == "threshold calibration", out
    assert compile_s > 0 and total_s > 0
    assert n > 16 and float(steady) > 0, out  # more images than one batch (16): a steady-state rate exists
    timing = result["timing"]
    assert timing["compile_s"] == pytest.approx(compile_s, abs=0.06) and timing["steady_img_per_s"] > 0


def test_stored_thresholds_give_the_chosen_false_positive_rate_and_f1_is_computed_at_them(tmp_path, monkeypatch):
    """Thresholds and F1 on numpy maps (no model, no training).

    Thresholds from `normal_stats` on a normal set flag about (1 - quantile) of that set's pixels
    / images; `evaluate` reports the F1 of predictions at exactly those thresholds.
    """
    from iepjax import metrics as M
    from iepjax.config import ProjectionConfig
    from iepjax.data import Split
    from iepjax.localization import Localization
    from iepjax.pipelines import project as pipeline
    from iepjax.thresholds import normal_stats

    rng = np.random.default_rng(0)
    size, pq, iq = 32, 0.99, 0.9

    def normal_maps(n):
        return rng.gamma(2.0, 0.05, size=(n, size, size)).astype(np.float32)

    normal = normal_maps(200)
    st = normal_stats(normal, pixel_quantile=pq, image_quantile=iq)
    assert (st.pixel_quantile, st.image_quantile, st.n_images) == (pq, iq, 200)
    pixel_fpr = np.mean(normal >= st.pixel_threshold)
    image_fpr = np.mean(M.image_scores(normal) >= st.image_threshold)
    assert abs(pixel_fpr - (1 - pq)) < 1e-3, pixel_fpr
    assert abs(image_fpr - (1 - iq)) <= 1 / 200 + 1e-9, image_fpr
    fresh = normal_maps(400)  # new normal images of the same kind: close to the quantile too
    assert abs(np.mean(fresh >= st.pixel_threshold) - (1 - pq)) < 2e-3
    assert abs(np.mean(M.image_scores(fresh) >= st.image_threshold) - (1 - iq)) < 0.05

    # a labelled test set: 20 good, 20 with a bright square in the mask
    n_good, n_bad = 20, 20
    maps = normal_maps(n_good + n_bad)
    masks = np.zeros_like(maps, dtype=bool)
    for i in range(n_good, n_good + n_bad):
        y, x = rng.integers(0, size - 8, 2)
        masks[i, y:y + 8, x:x + 8] = True
        maps[i, y:y + 8, x:x + 8] += rng.uniform(0.0, 0.6)  # some faint, some strong
    labels = np.r_[np.zeros(n_good, int), np.ones(n_bad, int)]
    images = rng.integers(0, 256, (len(maps), size, size, 1), dtype=np.uint8)
    ids = [f"{'good' if l == 0 else 'crack'}/{i:03d}" for i, l in enumerate(labels)]
    test = Split(images, masks, labels, ["good" if l == 0 else "crack" for l in labels], ids)
    x = images.astype(np.float32) / 255
    # a quarter of the model inputs in the first (compiling) batch, as with tiles that span batches
    loc = Localization(maps, maps * 0.5, x, x, np.ones((len(maps), 3), np.float32), 0.1, 0.2, 0.25)
    # the iteration strip needs a model: stand in the unchanged images for x_t
    monkeypatch.setattr(pipeline, "trajectory", lambda params, x0, config, frames=6: np.stack([x0, x0], axis=1))
    thresholds = {"grad": st, "recon": normal_stats(normal * 0.5, pixel_quantile=pq, image_quantile=iq)}
    result = pipeline.evaluate(None, ProjectionConfig(steps=3), test, loc, thresholds, tmp_path, overlays=False)
    stored = json.loads((tmp_path / "metrics.json").read_text())
    used = json.loads((tmp_path / "thresholds.json").read_text())
    assert used["grad"] == st._asdict()
    # the steady-state rate counts the images after the first batch: 3/4 of them in 0.2 - 0.1 s
    assert stored["timing"]["steady_img_per_s"] == pytest.approx(0.75 * len(maps) / 0.1, rel=1e-3)
    assert used["source"] == "held-out normal training images" and used["projection"]["steps"] == 3
    assert stored["grad"]["pixel_f1"] == result["grad"]["pixel_f1"]
    g = stored["grad"]
    assert g["pixel_threshold"] == st.pixel_threshold and g["image_threshold"] == st.image_threshold
    assert stored["thresholds"]["source"] == "held-out normal training images"
    assert (stored["thresholds"]["pixel_quantile"], stored["thresholds"]["image_quantile"]) == (pq, iq)
    pixel_f1 = M.f1_at_threshold(maps, masks, st.pixel_threshold)
    image_f1 = M.f1_at_threshold(maps.max(axis=(1, 2)), labels, st.image_threshold)
    assert g["pixel_f1"] == pytest.approx(pixel_f1, abs=1e-12)
    assert g["image_f1"] == pytest.approx(image_f1, abs=1e-12)
    # ... and not at some other threshold (the check can tell them apart)
    assert abs(M.f1_at_threshold(maps, masks, float(np.quantile(normal, 0.9))) - pixel_f1) > 0.01
    assert abs(M.f1_at_threshold(maps.max(axis=(1, 2)), labels, float(np.quantile(maps, 0.5))) - image_f1) > 0.01
    assert g["pixel_fpr_good_test"] == pytest.approx(np.mean(maps[:n_good] >= st.pixel_threshold))
    r = stored["recon"]
    assert r["pixel_f1"] == pytest.approx(M.f1_at_threshold(maps * 0.5, masks, thresholds["recon"].pixel_threshold))
    with open(tmp_path / "scores.csv", newline="") as f:
        preds = [int(row["pred_label"]) for row in csv.DictReader(f)]
    assert preds == [int(s >= st.image_threshold) for s in maps.max(axis=(1, 2))]


# The failure cases run main() in-process: they stop before any JAX work, and a subprocess would
# only add an interpreter start and the imports to each.

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


@pytest.mark.parametrize("script,value,says", [("train.py", "0", "give 1 or more"), ("project.py", "two", "not a whole number")])
def test_bad_cpu_devices_is_a_usage_error(tmp_path, capsys, script, value, says):
    code, err = _main(script, ["--category", "brick", "--results", str(tmp_path), "--cpu-devices", value], capsys)
    assert code == 2
    assert "--cpu-devices" in err and says in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("script,flag,value,says", [
    ("train.py", "--steps", "0", "give 1 or more"), ("train.py", "--batch-size", "0", "give 1 or more"),
    ("train.py", "--lr", "-1", "above 0"), ("train.py", "--lr", "nan", "finite number"),
    ("train.py", "--holdout", "1.5", "fraction in [0, 1)"), ("train.py", "--pixel-quantile", "0", "quantile"),
    ("train.py", "--size", "33", "argument --size/--image-size: 33: must be a multiple of 16, at least 32"),
    ("project.py", "--steps", "-1", "give 0 or more"), ("project.py", "--alpha", "-1", "give 0 or more"),
    ("project.py", "--sigma", "-2", "give 0 or more"), ("project.py", "--lam", "x", "not a number"),
    ("project.py", "--batch-size", "0", "give 1 or more"), ("project.py", "--image-quantile", "1.5", "quantile")])
def test_bad_numbers_are_usage_errors(tmp_path, capsys, script, flag, value, says):
    """A count, rate or quantile out of range stops the script at once with a usage error that says
    what is allowed (before, --steps 0 silently meant the preset and --lr -1 trained a broken run)."""
    code, err = _main(script, ["--category", "brick", "--results", str(tmp_path), flag, value], capsys)
    assert code == 2
    assert says in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flag,value,says", [("--steps", "0", "give 1 or more"), ("--proj-steps", "-1", "give 0 or more"),
                                             ("--holdout", "1", "fraction in [0, 1)"),
                                             ("--image-size", "33", "33: must be a multiple of 16, at least 32")])
def test_reproduce_bad_numbers_are_usage_errors(tmp_path, capsys, flag, value, says):
    code, err = _main("reproduce.py", ["--categories", "carpet", "--results", str(tmp_path), flag, value], capsys)
    assert code == 2
    assert flag in err and says in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("value,says", [("0", "give 1 or more"), ("65", "tile_stride=65")])
def test_bad_tile_stride_is_a_usage_error(tmp_path, capsys, value, says):
    code, err = _main("train.py", ["--category", "brick", "--results", str(tmp_path), "--tile-stride", value], capsys)
    assert code == 2
    assert says in err, err
    assert not any(tmp_path.iterdir())


# --- tools/seeds.py: the spread of the metrics over training seeds -------------------------------

def _metrics(recon: float, grad: float) -> dict:
    return {row: {"pixel_auroc": v, "image_auroc": 0.5, "pixel_aupro": v / 2} for row, v in (("recon", recon), ("grad", grad))}


def test_alpha_and_lam_flags_replace_the_step_and_hold_they_stand_for():
    """--alpha / --lam give the value as such (the preset's step / hold no longer resolve it);
    --step / --hold give them in the model's units; the other setting keeps the preset's kind."""
    import argparse

    from iepjax import cli, presets
    p = argparse.ArgumentParser()
    cli.add_projection_flags(p)
    pre = presets.projection_config("textures", "brick")
    assert cli.projection_settings(p.parse_args([]), pre) == pre
    a = cli.projection_settings(p.parse_args(["--alpha", "0.05"]), pre)
    assert (a.alpha, a.step, a.lam, a.hold) == (0.05, None, pre.lam, pre.hold)
    b = cli.projection_settings(p.parse_args(["--lam", "3", "--step", "2e-3"]), pre)
    assert (b.lam, b.hold, b.step) == (3.0, None, 2e-3)
    c = cli.projection_settings(p.parse_args(["--alpha", "0.05", "--lam", "3"]), pre)
    assert c.resolved and (c.alpha, c.lam) == (0.05, 3.0)


def test_seeds_summary_matches_a_hand_computed_case():
    seeds = _load(ROOT / "tools" / "seeds.py")
    rows = [seeds.seed_row(0, _metrics(0.80, 0.82)), seeds.seed_row(1, _metrics(0.81, 0.85))]
    assert rows[0]["margin_pixel_auroc"] == 0.02 and rows[1]["margin_pixel_auroc"] == 0.04
    s = seeds.summarise(rows)
    assert s["seeds"] == [0, 1]
    # margins 0.02 and 0.04: mean 0.03, sample std |0.04 - 0.02| / sqrt(2) = 0.01414
    assert s["margin_pixel_auroc"] == {"mean": 0.03, "std": 0.0141, "min": 0.02, "max": 0.04}
    assert s["grad_pixel_auroc"]["mean"] == 0.835 and s["recon_pixel_aupro"]["max"] == 0.405
    assert seeds.summarise(rows[:1])["margin_pixel_auroc"]["std"] == 0.0


@slow
def test_seeds_reads_scored_runs_and_does_not_rerun_them(e2e, tmp_path, capsys):
    """A seed folder that already holds a scored projection is read, not trained again; the rows are
    that projection's metrics.json."""
    seeds = _load(ROOT / "tools" / "seeds.py")
    for s in (0, 3):
        (tmp_path / f"seed{s}").symlink_to(e2e["results"], target_is_directory=True)
    before = _snapshot(e2e["run_dir"])
    assert seeds.main(["--category", "brick", "--seeds", "0", "3", "--results", str(tmp_path)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    out_dir = _folder(e2e["project_out"], "output folder")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert [r["seed"] for r in lines[:2]] == [0, 3]
    assert Path(lines[0]["metrics"]).resolve() == (out_dir / "metrics.json").resolve()
    margin = round(metrics["grad"]["pixel_auroc"] - metrics["recon"]["pixel_auroc"], 4)
    assert lines[0]["margin_pixel_auroc"] == margin
    assert lines[2]["margin_pixel_auroc"] == {"mean": margin, "std": 0.0, "min": margin, "max": margin}
    assert _snapshot(e2e["run_dir"]) == before


def test_a_run_without_held_out_images_projects_with_alpha_and_lam_as_given(tiny_run, tmp_path, capsys):
    """A run trained with --holdout 0 (both thresholds then given, no early stop) has no normal image
    to resolve the preset's step and hold on: the preset's alpha and lam are used, with a warning."""
    from iepjax import presets
    from iepjax.config import DataConfig, ThresholdConfig
    from iepjax.pipelines.project import prepare_run

    _, run_dir = copy_results(tiny_run, tmp_path / "results")
    holdout = json.loads((run_dir / "holdout.json").read_text())
    (run_dir / "holdout.json").write_text(json.dumps({**holdout, "ids": []}))
    given = ThresholdConfig(pixel_threshold=0.1, image_threshold=0.2, early_stop=False)
    run = prepare_run(run_dir, DataConfig("textures", "brick", str(tiny_run["tfds"])), None, given, progress=False)
    pre = presets.projection_config("textures", "brick")
    assert run.config.resolved and (run.config.alpha, run.config.lam) == (pre.alpha, pre.lam) and run.scale is None
    assert "holds out no normal image to resolve" in capsys.readouterr().err


def test_a_run_without_held_out_images_takes_everything_from_a_normal_folder(tiny_run, tmp_path, capsys):
    """A run trained on all its images (--holdout 0) and a folder of other normal images (--normal-dir):
    step and hold are resolved, the early-stopping bar set and the thresholds fitted on that folder's
    images, and nothing of it is written into the run folder (it would pass for the held-out images')."""
    from PIL import Image

    from iepjax import data, loss_scale, presets
    from iepjax.config import DataConfig, ThresholdConfig
    from iepjax.data.preprocess import model_inputs
    from iepjax.early_stop import model_losses
    from iepjax.pipelines.project import prepare_run
    from iepjax.thresholds import ThresholdError, check_held_out

    _, run_dir = copy_results(tiny_run, tmp_path / "results")
    holdout = json.loads((run_dir / "holdout.json").read_text())
    (run_dir / "holdout.json").write_text(json.dumps({**holdout, "ids": []}))
    (run_dir / "loss_scale.json").unlink()
    train = data.load_split("textures", "brick", "train", str(tiny_run["tfds"]), progress=False)
    line = tmp_path / "line"
    line.mkdir()
    for k, im in enumerate(train.images[:12]):
        Image.fromarray(im[..., 0]).save(line / f"{k:02d}.png")
    with pytest.raises(ThresholdError, match="--no-early-stop"):  # no held-out image, no folder: refused
        check_held_out(run_dir, ThresholdConfig())
    preset = dataclasses.replace(presets.projection_config("textures", "brick", size=32), steps=2)
    run = prepare_run(run_dir, DataConfig("textures", "brick", str(tiny_run["tfds"])), preset,
                      ThresholdConfig(normal_dir=str(line)), progress=False)
    assert "holds out no normal image" not in capsys.readouterr().err
    assert run.source == f"12 normal images in {line}" and run.config.resolved and run.scale["n_images"] == 12
    images = np.stack(train.images[:12])
    x = model_inputs(images, run.prep)[0].astype(np.float32) / 255.0
    preset = dataclasses.replace(preset, model=run.config.model)
    want, _ = loss_scale.resolve(run.params, preset, x)  # the folder's images resolve step and hold
    assert (run.config.alpha, run.config.lam) == pytest.approx((want.alpha, want.lam), rel=1e-5)
    losses, _ = model_losses(run.params, dataclasses.replace(run.config, stop_loss=None), images, run.prep)
    assert run.config.stop_loss == pytest.approx(float(losses.min()), rel=1e-6)  # and set the bar
    assert not (run_dir / "loss_scale.json").exists()


def test_normal_losses_prints_the_three_sets_of_normal_images(tiny_run, tmp_path, capsys):
    """tools/normal_losses.py on the tiny run: one line per set (its 11 held-out images, as many other
    training images, the normal test images), quantiles in order; a folder that is no run, or a run
    without held-out images, is exit 2."""
    tool = _load(ROOT / "tools" / "normal_losses.py")
    args = ["--category", "brick", "--tfds-dir", str(tiny_run["tfds"]), "--data-seed", "0"]
    assert tool.main(["--run", str(tiny_run["run_dir"]), *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["held-out normal training images", "other training images",
                                                      "normal test images (data seed 0)"]
    assert lines[0].startswith("held-out normal training images: 11 images") and " other training images: 11 images" in " " + lines[1]
    for line in lines:
        q = [float(v) for v in re.findall(r"(?:min|p10|median|p90) (-?[\d.]+)", line)]
        assert len(q) == 4 and q == sorted(q) and all(np.isfinite(q)), line
    assert tool.main(["--run", str(tmp_path), *args]) == 2 and "not a run folder" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")  # a run that holds out nothing
    assert tool.main(["--run", str(tmp_path), *args]) == 2 and "holds out no normal" in capsys.readouterr().err


def test_map_choice_compares_the_maps_on_cutpaste_defects_of_held_out_images_only(tiny_run, tmp_path, capsys,
                                                                                   monkeypatch):
    """tools/map_choice.py on a copy of the tiny run: the pixel AUROC of both maps, both rows, on CutPaste
    defects drawn on half of its 11 held-out images (the other half fits the nce map), and the grad row's
    better map; no split but the training images' is read; a folder that is no run is exit 2.
    `cutpaste` changes only the pixels of its mask, a rectangle of 12 to 24 px (or a thin one)."""
    tool = _load(ROOT / "tools" / "map_choice.py")
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rng = np.random.default_rng(3)
    for _ in range(20):
        out, mask = tool.cutpaste(img, rng)
        assert out.shape == img.shape and np.array_equal(out[~mask], img[~mask])
        ys, xs = np.nonzero(mask)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert 12 <= max(h, w) <= 24 and 4 <= min(h, w) and mask.sum() >= 0.9 * h * w

    import iepjax.data as data_module
    real = data_module.load_split

    def training_images_only(dataset, category, split, *args, **kwargs):
        assert split == "train", f"the tool read the {split} split"
        return real(dataset, category, split, *args, **kwargs)

    monkeypatch.setattr(data_module, "load_split", training_images_only)
    _, run_dir = copy_results(tiny_run, tmp_path / "results")
    args = ["--category", "brick", "--tfds-dir", str(tiny_run["tfds"]), "--steps", "2"]
    assert tool.main(["--run", str(run_dir), *args]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["held_out"], out["fit_on"], out["cutpaste"]) == (11, 6, 5)
    for key in ("recon paper", "recon nce", "grad paper", "grad nce"):
        assert 0.0 <= out[key] <= 1.0, (key, out)
    assert out["suggests"] == ("nce" if out["grad nce"] > out["grad paper"] else "paper")
    assert tool.main(["--run", str(tmp_path), *args]) == 2 and "not a run folder" in capsys.readouterr().err


def test_a_projection_within_one_batch_reports_no_steady_state_rate():
    """project.py's timing line: the steady-state rate, or, when every image was in the first (compiling)
    batch, says there is none (it printed "steady state None img/s")."""
    from iepjax.report import format_projection, steady_rate
    assert steady_rate({"steady_img_per_s": 1.5}) == "steady state 1.5 img/s"
    assert steady_rate({"steady_img_per_s": None}) == "no steady-state rate (every image was in the first batch)"
    row = {"pixel_auroc": 0.5, "image_auroc": 0.5, "pixel_aupro": 0.5, "pixel_threshold": 0.1, "image_threshold": 0.2}
    result = {"recon": row, "grad": row, "thresholds": {"source": "given"},
              "timing": {"compile_s": 3.8, "total_s": 3.8, "steady_img_per_s": None}}
    out = format_projection(result)
    assert "None" not in out and out.endswith("compile 3.8 s, total 3.8 s, no steady-state rate (every image was in the first batch)")


@slow
def test_project_fits_the_thresholds_on_a_folder_of_normal_images(tiny_run, tmp_path, capsys):
    """project.py --normal-dir: the thresholds are fitted on the readable images of a folder (good parts
    imaged as the test images are) instead of the run's held-out training images; metrics.json and
    the projection's thresholds.json say so, the run folder's own fit is left alone, an unreadable
    file is named and skipped. A missing folder, and one with too few images, are refused (exit 2)
    with what to do. export.py --normal-dir ships the thresholds of the same fit."""
    from PIL import Image

    from iepjax import data
    results, run_dir = copy_results(tiny_run, tmp_path / "results")
    held = (run_dir / "thresholds.json").read_text()
    train = data.load_split("textures", "brick", "train", str(tiny_run["tfds"]), progress=False)
    held_ids = set(json.loads((run_dir / "holdout.json").read_text())["ids"])
    others = [im for im, i in zip(train.images, train.ids) if i not in held_ids][:12]  # not the held-out ones
    line = tmp_path / "line"
    (line / "shift2").mkdir(parents=True)
    for k, im in enumerate(others):
        Image.fromarray(im[..., 0]).save(line / ("shift2" if k % 2 else "") / f"{k:02d}.png")
    (line / "broken.png").write_bytes(b"not an image")
    base = [*TINY_PROJECT, "--results", str(results), "--tfds-dir", str(tiny_run["tfds"]), "--no-overlays"]
    before = set((run_dir / "projections").iterdir())
    code, err = _main("project.py", base + ["--normal-dir", str(line)], capsys)
    assert code == 0, err[-3000:]
    assert "broken.png" in err and "skipped" in err
    (out,) = set((run_dir / "projections").iterdir()) - before
    metrics = json.loads((out / "metrics.json").read_text())
    used = json.loads((out / "thresholds.json").read_text())
    assert metrics["thresholds"]["source"] == used["source"] == f"12 normal images in {line}"
    assert metrics["thresholds"]["n_normal_images"] == used["grad"]["n_images"] == 12  # not the 11 held out
    assert (run_dir / "thresholds.json").read_text() == held  # the held-out fit is kept as it was
    fitted = json.loads(held)
    assert used["grad"]["pixel_threshold"] != fitted["grad"]["pixel_threshold"]
    assert metrics["grad"]["pixel_threshold"] == used["grad"]["pixel_threshold"]

    code, err = _main("project.py", base + ["--normal-dir", str(tmp_path / "none")], capsys)
    assert code == 2 and "does not exist" in err, err[-2000:]
    few = tmp_path / "few"
    few.mkdir()
    for k, im in enumerate(others[:3]):
        Image.fromarray(im[..., 0]).save(few / f"{k}.png")
    code, err = _main("project.py", base + ["--normal-dir", str(few)], capsys)
    assert code == 2 and "holds 3 readable normal image(s)" in err and "add normal images" in err, err[-2000:]

    # export.py --normal-dir ships thresholds fitted on the folder: those of the projection above (same
    # settings, images and quantiles); the metrics measured at other thresholds are left out
    export = ["--category", "brick", "--results", str(results), "--allow-collapse", "--platforms", "cpu",
              "--no-progress"]
    code, err = _main("export.py", export + ["--normal-dir", str(line), "--out", str(tmp_path / "model")], capsys)
    assert code == 0, err[-3000:]
    assert "broken.png" in err and "skipped" in err
    meta = json.loads((tmp_path / "model" / "metadata.json").read_text())
    th = meta["thresholds"]
    assert th["source"] == f"12 normal images in {line.resolve()}" and th["n_images"] == 12
    assert th["pixel_threshold"] == pytest.approx(used["grad"]["pixel_threshold"], rel=1e-5)
    assert th["image_threshold"] == pytest.approx(used["grad"]["image_threshold"], rel=1e-5)
    assert f"12 normal images in {line.resolve()}" in th["meaning"]
    assert "pixel_auroc" in meta["metrics"]["grad"] and "pixel_f1" not in meta["metrics"]["grad"]
    assert f"--normal-dir {line.resolve()}" in meta["source"]["reexport_command"]
    assert "were not measured" in (tmp_path / "model" / "MODEL_CARD.md").read_text()
    code, err = _main("export.py", export + ["--normal-dir", str(few), "--out", str(tmp_path / "m2")], capsys)
    assert code == 2 and "add normal images" in err and not (tmp_path / "m2" / "metadata.json").exists(), err[-2000:]


def test_compile_profile_records_each_compile_of_a_child_process(tmp_path, capsys):
    """tools/compile_profile.py runs a command and reports the backend compiles of the Python processes it
    starts (here one child that jits one function), by function name and seconds."""
    tool = _load(ROOT / "tools" / "compile_profile.py")
    child = "import jax, jax.numpy as jnp\ndef twice(x):\n    return 2 * x\njax.jit(twice)(jnp.ones(3))\n"
    out = tmp_path / "prof"
    assert tool.main(["--out", str(out), "--", sys.executable, "-c", child]) == 0
    (record,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    funs = [row[0] for row in record["rows"]]
    assert "jit(twice)" in funs and all(row[1] >= 0 for row in record["rows"])
    report = capsys.readouterr().out
    assert f"in {len(funs)} compiles, 1 processes" in report and "jit(twice)" in report
