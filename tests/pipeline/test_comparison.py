"""End to end, the paper's comparison on tiny data (a fake MVTec AD tree, one gray texture category,
32 px model, 2 training steps, 1 projection step): `reproduce.py` trains the three models and
writes the six columns and the VAE-grad ablations; a rerun reads the measured cells back;
`train.py --model ae_ssim` and `project.py --model ae_ssim` run; a run of one model is never
read as another. This checks the plumbing, not the quality.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from iepjax import runs
from iepjax.data import fake_tree

TINY = ["--steps", "2", "--batch-size", "4", "--holdout", "0.2", "--no-progress"]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    import reproduce

    base = tmp_path_factory.mktemp("comparison")
    src = fake_tree.make_fake_mvtec(base / "src", n_train=24)
    args = ["--data-dir", str(src), "--categories", "grid", "--tfds-dir", str(base / "tfds"), "--results",
            str(base / "results"), "--out", str(base / "table"), "--image-size", "32", "--proj-steps", "1",
            "--ablations", "--no-overlays", *TINY]
    rc = reproduce.main(args)
    return {"rc": rc, "base": base, "src": src, "args": args}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_reproduce_trains_the_three_models_and_the_ablations(table):
    assert table["rc"] == 0
    rows = _rows(table["base"] / "table" / "results.csv")
    got = [(r["model"], r["variant"]) for r in rows]
    assert got == [("vae", "paper"), ("vae", "detached"), ("vae", "no_weighting"), ("vae", "no_kl"),
                   ("vae", "no_early_stop"), ("ae_l2", "paper"), ("ae_ssim", "paper")]
    for r in rows:
        assert r["status"] == "ok" and r["category"] == "grid"
        assert f"/{r['model']}/folder/grid/" in r["run_dir"]  # results/<model>/<dataset>/<category>/v<N>
        assert runs.run_model(r["run_dir"]) == r["model"]
        for k in ("recon_pixel_auroc", "grad_pixel_auroc", "grad_image_auroc", "grad_aupro"):
            assert 0.0 <= float(r[k]) <= 1.0
    # the ablations project the same trained VAE; no weighting takes a smaller alpha
    vae = [r for r in rows if r["model"] == "vae"]
    assert len({r["run_dir"] for r in vae}) == 1 and len({r["projection_dir"] for r in vae}) == 5
    paper, plain = vae[0], vae[2]
    assert 0 < float(plain["alpha"]) < float(paper["alpha"])
    md = (table["base"] / "table" / "results.md").read_text()
    assert "| category | AE-L2 | AE-L2-grad | AE-SSIM | AE-SSIM-grad | VAE | VAE-grad | note |" in md
    assert "| *paper, reported mean* | 0.82 | — | 0.87 | — | — | 0.86-0.89 |" in md
    assert "## VAE-grad ablations" in md and "| grid |" in md
    assert json.loads((table["base"] / "table" / "meta.json").read_text())["models"] == ["vae", "ae_l2", "ae_ssim"]


def test_the_ae_runs_project_with_their_own_loss(table):
    rows = {r["model"]: r for r in _rows(table["base"] / "table" / "results.csv") if r["variant"] == "paper"}
    for model, loss in (("ae_l2", "l2"), ("ae_ssim", "ssim")):
        proj = json.loads((Path(rows[model]["projection_dir"]) / "projection_config.json").read_text())
        assert proj["model"]["likelihood"] == loss and proj["model"]["use_kl"] is False
        assert proj["gradient"] == "full"
    det = json.loads((Path(_rows(table["base"] / "table" / "results.csv")[1]["projection_dir"])
                      / "projection_config.json").read_text())
    assert det["gradient"] == "detached"


def test_a_rerun_reads_the_measured_cells_back(table, capsys):
    import reproduce

    out = table["base"] / "table"
    before = (out / "results.csv").read_text()
    assert reproduce.main(table["args"]) == 0
    err = capsys.readouterr().err
    assert err.count("measured before") == 7
    assert (out / "results.csv").read_text() == before


def test_train_and_project_ae_ssim_end_to_end(table, tmp_path, capsys):
    import project
    import train

    src, results = table["src"], tmp_path / "results"
    common = ["--data-dir", str(src), "--category", "grid", "--tfds-dir", str(table["base"] / "tfds"),
              "--results", str(results)]
    rc = train.main([*common, "--model", "ae_ssim", "--size", "32", "--allow-collapse", "--proj-steps", "1", *TINY])
    out = capsys.readouterr().out
    assert rc == 0, out
    run_dir = Path(out.strip().splitlines()[-1].split("run folder: ")[1])
    assert run_dir.parent.parent.parent.name == "ae_ssim"
    cfg = json.loads((run_dir / "config.json").read_text())["model"]
    assert cfg["likelihood"] == "ssim" and cfg["use_kl"] is False
    rc = project.main([*common, "--model", "ae_ssim", "--steps", "1", "--no-progress", "--no-overlays",
                       "--allow-collapse"])
    out = capsys.readouterr().out
    assert rc == 0 and "pixel AUROC" in out
    # the VAE's project.py finds no VAE run here, and refuses the AE's run given by path
    rc = project.main([*common, "--steps", "1", "--no-progress", "--allow-collapse"])
    assert rc == 2 and "no trained run" in capsys.readouterr().err
    rc = project.main([*common, "--run", str(run_dir), "--steps", "1", "--no-progress", "--allow-collapse"])
    assert rc == 2 and "is a ae_ssim run" in capsys.readouterr().err


def test_a_run_of_one_model_is_never_read_as_another(table, tmp_path):
    """find_run refuses a folder whose config.json names another model, whether given by path or
    found as the latest run under another model's folder (a copied or misplaced run)."""
    rows = {r["model"]: r for r in _rows(table["base"] / "table" / "results.csv") if r["variant"] == "paper"}
    l2_run = Path(rows["ae_l2"]["run_dir"])
    root = table["base"] / "results"
    for model in ("vae", "ae_ssim"):
        with pytest.raises(ValueError, match="is a ae_l2 run.*--model ae_l2"):
            runs.find_run(root, model, "folder", "grid", str(l2_run))
    assert runs.find_run(root, "ae_l2", "folder", "grid", str(l2_run)) == l2_run.resolve()
    misplaced = tmp_path / "vae" / "folder" / "grid"
    misplaced.mkdir(parents=True)
    shutil.copytree(l2_run, misplaced / "v0", symlinks=True)
    with pytest.raises(ValueError, match="is a ae_l2 run"):
        runs.find_run(tmp_path, "vae", "folder", "grid")
