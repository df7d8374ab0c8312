"""The paper's comparison table, measured here: train the three models on a list of categories and evaluate them.

    outcome = reproduce([Plan(category, model, TrainConfig, Preprocess, ProjectionConfig), ...], DataConfig, out)

For each category and model (VAE, AE-L2, AE-SSIM; docs/method.md, Models): train it
(`pipelines.train.train_run`; an unfinished run is resumed), fit thresholds on held-out normal
images, project the test images and score the maps at each test image's original size
(`pipelines.project.project_run`). Each projection gives two of the table's columns: the model's
plain row (its reconstruction map) and its "-grad" row (|x_T - x0|). With `ablations`, the VAE is
projected again with one switch changed at a time (`ABLATIONS`). The tables
(`report.write_reproduction`: out/results.csv, out/results.md) are written after every cell, and
each cell's result is kept in out/cells/: a rerun with the same settings reuses it, so an
interrupted run resumes per category and model (docs/method.md, Evaluation).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from iepjax import atomic, loss_scale, report, sharding
from iepjax.config import DataConfig, ProjectionConfig, ThresholdConfig, TrainConfig, to_dict
from iepjax.data.preprocess import Preprocess, model_inputs, resize_images
from iepjax.pipelines.project import project_run
from iepjax.pipelines.train import train_run
from iepjax.thresholds import held_out_images, min_held_out

# The VAE-grad ablations (docs/method.md, Projection): one switch each, the rest as the paper's.
ABLATIONS: tuple[str, ...] = ("detached", "no_weighting", "no_kl", "no_early_stop")


class Plan(NamedTuple):
    """One category's configs for one model ("vae", "ae_l2" or "ae_ssim")."""

    category: str
    model: str
    train: TrainConfig
    prep: Preprocess
    projection: ProjectionConfig


class Reproduction(NamedTuple):
    """The table's rows, how many failed, and the error that stopped the run (None: none did)."""

    rows: list[dict]
    failed: int
    stopped_by: Exception | None


def _unweighted_alpha(run_dir: Path, source: DataConfig, config: ProjectionConfig, prep: Preprocess) -> float:
    """alpha for the plain gradient step (no weighting) when alpha is given as such (not as a `step`,
    which `loss_scale.resolve` resolves without the weight): the weighted alpha times the mean weight
    (x0 - f(x0))^2 over the run's held-out normal pixels, so that a typical normal pixel's first step
    is as long as with the weighting (`loss_scale.measure`; no test image, no label)."""
    from iepjax.training import load_checkpoint
    params, tcfg, _ = load_checkpoint(run_dir)
    normal = held_out_images(run_dir, source.dataset, source.category, source.tfds_dir, source_dir=source.source_dir)
    x = model_inputs(normal, prep)[0] if prep is not None else resize_images(normal, tcfg.model.size)
    scale = loss_scale.measure(params, dataclasses.replace(config, model=tcfg.model), np.asarray(x, np.float32) / 255.0,
                               0.5)
    return config.alpha * scale.weight_mean


def variant(plan: Plan, name: str, thresholds: ThresholdConfig) -> tuple[ProjectionConfig, ThresholdConfig]:
    """The projection and threshold settings of the VAE-grad ablation `name` ("paper" or one of ABLATIONS)."""
    cfg = plan.projection
    if name == "detached":
        cfg = dataclasses.replace(cfg, gradient="detached")
    elif name == "no_weighting":
        cfg = dataclasses.replace(cfg, weighting=False)  # alpha rescaled in `run_cell`
    elif name == "no_kl":
        cfg = dataclasses.replace(cfg, use_kl=False)
    elif name == "no_early_stop":
        thresholds = dataclasses.replace(thresholds, early_stop=False)
    elif name != "paper":
        raise ValueError(f"unknown ablation {name!r}: choose one of {', '.join(ABLATIONS)}")
    return cfg, thresholds


def run_cell(plan: Plan, name: str, source: DataConfig, thresholds: ThresholdConfig, *, results: str | os.PathLike,
             cells: Path, batch_size: int = 16, overlays: bool = True, progress: bool = True) -> dict:
    """Train (or resume) plan's model and evaluate one projection variant; returns its row.

    A cell already measured with the same settings (out/cells/<category>/<model>-<variant>.json) is
    read back instead. The batches are split over the most devices that divide the training batch.
    """
    t0 = time.time()
    source = dataclasses.replace(source, category=plan.category)
    config, th = variant(plan, name, thresholds)
    key = {"train": to_dict(plan.train), "prep": plan.prep.to_dict(), "projection": to_dict(config),
           "thresholds": to_dict(th), "source": to_dict(source)}
    cell = cells / plan.category / f"{plan.model}-{name}.json"
    if cell.exists():
        stored = json.loads(cell.read_text())
        if stored.get("key") == json.loads(json.dumps(key)):
            print(f"{plan.category} {plan.model} {name}: measured before, read from {cell}", file=sys.stderr)
            return stored["row"]
    mesh = sharding.make_mesh(divides=plan.train.batch_size)
    # trained with the paper's threshold settings whatever the variant: the held-out share depends on
    # them (`thresholds.min_held_out`), and every variant must project the same trained model
    run_dir, summary = train_run(plan.train, plan.prep, source, holdout=thresholds.holdout, results=results,
                                 progress=progress, mesh=mesh,
                                 min_held_out=min_held_out(thresholds) if thresholds.holdout > 0 else 1)
    if name == "no_weighting" and config.step is None:  # a step in the model's units resolves without the weight
        config = dataclasses.replace(config, alpha=_unweighted_alpha(run_dir, source, config, Preprocess.load(run_dir)))
    proj_dir, res = project_run(run_dir, source, config, th, batch_size=batch_size, overlays=overlays,
                                progress=progress, mesh=mesh)
    protocol = res.get("protocol", {})
    used = json.loads((Path(proj_dir) / "projection_config.json").read_text())  # alpha and lam as resolved
    row = {"category": plan.category, "kind": plan.prep.kind, "model": plan.model, "variant": name, "status": "ok",
           "train_steps": plan.train.steps, "collapsed": bool(summary.collapse.collapsed),
           "n_test": protocol.get("n_images"), "skipped_pixel_images": len(protocol.get("skipped_pixel_metrics", [])),
           **{k: used[k] for k in ("alpha", "lam")}, "minutes": round((time.time() - t0) / 60, 2),
           "run_dir": str(run_dir), "projection_dir": str(proj_dir)}
    for r in ("recon", "grad"):
        row[f"{r}_pixel_auroc"] = res[r]["pixel_auroc"]
        row[f"{r}_image_auroc"] = res[r]["image_auroc"]
        row[f"{r}_aupro"] = res[r]["pixel_aupro"]
    cell.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(cell, {"key": key, "row": row})
    return row


def run_category(plan: Plan, source: DataConfig, thresholds: ThresholdConfig, *, results: str | os.PathLike,
                 batch_size: int = 16, overlays: bool = True, progress: bool = True, cells: Path | None = None) -> dict:
    """Train (or resume) and evaluate one category's model with the paper's settings; returns its row."""
    cells = cells if cells is not None else Path(results) / "reproduce" / "cells"
    return run_cell(plan, "paper", source, thresholds, results=results, cells=cells, batch_size=batch_size,
                    overlays=overlays, progress=progress)


def reproduce(plans: list[Plan], source: DataConfig, out: Path, meta: dict,
              thresholds: ThresholdConfig = ThresholdConfig(), *, results: str | os.PathLike = "results",
              keep_going: bool = False, ablations: bool = False, **project) -> Reproduction:
    """`run_cell` for each plan (and, with `ablations`, each VAE plan's ABLATIONS), the tables
    rewritten after each; meta.json once all are done.

    `meta`: the table's header (`report.write_reproduction`). A failing cell is a row with its
    error; it stops the run unless `keep_going`. `project`: batch_size, overlays, progress of
    `run_cell`.
    """
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    failed = 0
    for plan in plans:
        names = ("paper",) + (ABLATIONS if ablations and plan.model == "vae" else ())
        for name in names:
            print(f"=== {plan.category} {plan.model}{'' if name == 'paper' else ' ' + name} ===", file=sys.stderr)
            try:
                rows.append(run_cell(plan, name, source, thresholds, results=results, cells=out / "cells", **project))
            except Exception as e:  # noqa: BLE001 - recorded in the table, and returned unless keep_going
                failed += 1
                rows.append({"category": plan.category, "model": plan.model, "variant": name,
                             "status": f"error: {type(e).__name__}: {e}".replace("|", "/")[:300]})
                report.write_reproduction(out, rows, meta)
                if not keep_going:
                    return Reproduction(rows, failed, e)
            report.write_reproduction(out, rows, meta)
    atomic.write_json(out / "meta.json", meta)  # strict JSON, written whole
    return Reproduction(rows, failed, None)
