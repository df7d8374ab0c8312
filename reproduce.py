"""Reproduce the paper's MVTec AD table: train and evaluate a list of categories, one command.

    python reproduce.py --manual-dir ~/mvtec_anomaly_detection          # all 15 MVTec AD categories
    python reproduce.py --categories carpet,bottle                      # two (already prepared)
    python reproduce.py --data-dir my_images --categories widget,gadget # own folders, same protocol

For each category: train the VAE with the category preset (iepjax/presets.py; resumes an
unfinished run), fit thresholds on held-out normal images, project the test images and score the
maps at each test image's original size (iepjax/pipelines/reproduce.py). Writes <out>/results.csv
and <out>/results.md (rows "recon" = VAE |x0 - f(x0)|, "grad" = VAE-grad, the projection) beside
the paper's reported means, after every category, so an interrupted run keeps what it measured.
Numbers in the table are only ever those measured here; the paper's are quoted as reported.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from iepjax import cli, presets
from iepjax.config import DataConfig
from iepjax.data.layout import MVTEC_CATEGORIES
from iepjax.pipelines import Plan, reproduce


def plan(a: argparse.Namespace, dataset: str, category: str) -> Plan:
    """The category's presets with the command line's sizes, lengths and seed."""
    train = cli.override(presets.train_config(dataset, category, size=a.image_size), steps=a.steps,
                         batch_size=a.batch_size, seed=a.seed)
    projection = cli.override(presets.projection_config(dataset, category, train.model.likelihood), steps=a.proj_steps)
    return Plan(category, train, presets.preprocess(dataset, category, size=train.model.size), projection)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--categories", default=",".join(MVTEC_CATEGORIES), help="comma-separated (default: all 15)")
    cli.add_data_flags(p, one_category=False)
    p.add_argument("--out", default=None, help="where results.md / results.csv go (default <results>/reproduce)")
    p.add_argument("--steps", type=cli.positive_int, help="training steps (default: the preset's)")
    p.add_argument("--batch-size", type=cli.positive_int, help="training batch size (default: the preset's)")
    p.add_argument("--proj-steps", type=cli.nonnegative_int, help="projection steps (default: the preset's)")
    p.add_argument("--proj-batch-size", type=cli.positive_int, default=16)
    p.add_argument("--image-size", type=cli.model_size, help="model input size (default 128; 256 also works)")
    p.add_argument("--holdout", type=cli.fraction, help="fraction of normal training images kept for thresholds (0.1)")
    p.add_argument("--seed", type=int, default=0)
    cli.add_output_flags(p)
    p.add_argument("--keep-going", action="store_true", help="continue with the next category after an error")
    cli.add_runtime_flags(p, multi_process=False)
    a = p.parse_args(argv)
    dataset, source_dir = ("folder", a.data_dir) if a.data_dir else ("mvtec_ad", a.manual_dir)
    categories = [c.strip() for c in a.categories.split(",") if c.strip()]
    bad = [c for c in categories if c not in MVTEC_CATEGORIES] if dataset == "mvtec_ad" else []
    if bad:
        p.error(f"unknown MVTec AD categories {bad}; valid: {', '.join(MVTEC_CATEGORIES)}")
    plans = [plan(a, dataset, c) for c in categories]
    cli.start_runtime(a, train=plans[0].train if plans else None,
                      projection_steps=max((q.projection.steps for q in plans), default=0))
    out = Path(a.out) if a.out else Path(a.results) / "reproduce"
    meta = {"data": f"{dataset} ({source_dir or 'prepared TFDS data'})", "size": a.image_size or 128,
            "steps": a.steps, "proj_steps": a.proj_steps, "categories": categories}
    done = reproduce(plans, DataConfig(dataset, "", a.tfds_dir, source_dir), out, meta, cli.threshold_config(a),
                     results=a.results, keep_going=a.keep_going, batch_size=a.proj_batch_size,
                     overlays=not a.no_overlays, progress=not a.no_progress)
    if done.stopped_by is not None:
        print(f"error in {done.rows[-1]['category']}: {done.stopped_by}\n"
              "(--keep-going continues with the other categories)", file=sys.stderr)
        return cli.EXIT_ERROR
    print((out / "results.md").read_text())
    print(f"tables: {out / 'results.md'}, {out / 'results.csv'}")
    return cli.EXIT_FAILED if done.failed else cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
