"""The paper's MVTec AD table, measured here: train and evaluate a list of categories.

    outcome = reproduce([Plan(category, TrainConfig, Preprocess, ProjectionConfig), ...], DataConfig, out)

For each category: train the VAE (`pipelines.train.train_run`; an unfinished run is resumed),
fit thresholds on held-out normal images, project the test images and score the maps at each
test image's original size (`pipelines.project.project_run`). The tables (`report.write_reproduction`:
out/results.csv and out/results.md, rows "recon" = VAE |x0 - f(x0)|, "grad" = VAE-grad) are
written after every category, so an interrupted run keeps what it measured (docs/method.md, Evaluation).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

from iepjax import atomic, report, sharding
from iepjax.config import DataConfig, ProjectionConfig, ThresholdConfig, TrainConfig
from iepjax.data.preprocess import Preprocess
from iepjax.pipelines.project import project_run
from iepjax.pipelines.train import train_run
from iepjax.thresholds import min_held_out


class Plan(NamedTuple):
    """One category's configs."""

    category: str
    train: TrainConfig
    prep: Preprocess
    projection: ProjectionConfig


class Reproduction(NamedTuple):
    """The table's rows, how many categories failed, and the error that stopped the run (None: none did)."""

    rows: list[dict]
    failed: int
    stopped_by: Exception | None


def run_category(plan: Plan, source: DataConfig, thresholds: ThresholdConfig, *, results: str | os.PathLike,
                 batch_size: int = 16, overlays: bool = True, progress: bool = True) -> dict:
    """Train (or resume) and evaluate one category; returns its table row. The batches are split
    over the most devices that divide the training batch (`sharding.make_mesh`)."""
    t0 = time.time()
    source = dataclasses.replace(source, category=plan.category)
    mesh = sharding.make_mesh(divides=plan.train.batch_size)
    run_dir, summary = train_run(plan.train, plan.prep, source, holdout=thresholds.holdout, results=results,
                                 progress=progress, mesh=mesh,
                                 min_held_out=min_held_out(thresholds) if thresholds.holdout > 0 else 1)
    proj_dir, res = project_run(run_dir, source, plan.projection, thresholds, batch_size=batch_size,
                                overlays=overlays, progress=progress, mesh=mesh)
    protocol = res.get("protocol", {})
    row = {"category": plan.category, "kind": plan.prep.kind, "status": "ok", "train_steps": plan.train.steps,
           "collapsed": bool(summary.collapse.collapsed), "n_test": protocol.get("n_images"),
           "skipped_pixel_images": len(protocol.get("skipped_pixel_metrics", [])),
           "minutes": round((time.time() - t0) / 60, 2), "run_dir": str(run_dir), "projection_dir": str(proj_dir)}
    for r in ("recon", "grad"):
        row[f"{r}_pixel_auroc"] = res[r]["pixel_auroc"]
        row[f"{r}_image_auroc"] = res[r]["image_auroc"]
        row[f"{r}_aupro"] = res[r]["pixel_aupro"]
    return row


def reproduce(plans: list[Plan], source: DataConfig, out: Path, meta: dict,
              thresholds: ThresholdConfig = ThresholdConfig(), *, results: str | os.PathLike = "results",
              keep_going: bool = False, **project) -> Reproduction:
    """`run_category` for each plan, the tables rewritten after each; meta.json once all are done.

    `meta`: the table's header (`report.write_reproduction`). A failing category is a row with
    its error; it stops the run unless `keep_going`. `project`: batch_size, overlays, progress of
    `run_category`.
    """
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    failed = 0
    for plan in plans:
        print(f"=== {plan.category} ===", file=sys.stderr)
        try:
            rows.append(run_category(plan, source, thresholds, results=results, **project))
        except Exception as e:  # noqa: BLE001 - recorded in the table, and returned unless keep_going
            failed += 1
            rows.append({"category": plan.category,
                         "status": f"error: {type(e).__name__}: {e}".replace("|", "/")[:300]})
            report.write_reproduction(out, rows, meta)
            if not keep_going:
                return Reproduction(rows, failed, e)
        report.write_reproduction(out, rows, meta)
    atomic.write_json(out / "meta.json", meta)  # strict JSON, written whole
    return Reproduction(rows, failed, None)
