"""Reproduce the paper's comparison: AE-L2, AE-SSIM and VAE, each with its "-grad" projection, per category.

    python reproduce.py --manual-dir ~/mvtec_anomaly_detection          # all 15 MVTec AD categories
    python reproduce.py --dataset textures --categories brick,grass     # the built-in data
    python reproduce.py --dataset textures --categories brick --ablations   # + the VAE-grad ablations
    python reproduce.py --categories carpet,bottle --models vae         # the VAE only
    python reproduce.py --data-dir my_images --categories widget,gadget # own folders, same protocol

For each category and model: train it with the category preset (iepjax/presets.py; resumes an
unfinished run), fit thresholds on held-out normal images, project the test images and score the
maps at each test image's original size (iepjax/pipelines/reproduce.py). Writes <out>/results.csv
and <out>/results.md (rows = categories and their mean; columns AE-L2, AE-L2-grad, AE-SSIM,
AE-SSIM-grad, VAE, VAE-grad pixel AUROC, beside the paper's reported means) after every
category and model, so an interrupted run keeps what it measured; a rerun reads back what was
measured with the same settings (<out>/cells/). Numbers in the table are only ever those measured
here; the paper's are quoted as reported.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from iepjax import cli, presets
from iepjax.config import MODELS, DataConfig
from iepjax.data.layout import MVTEC_CATEGORIES
from iepjax.pipelines import Plan, reproduce


def plan(a: argparse.Namespace, dataset: str, category: str, model: str = "vae") -> Plan:
    """The category's presets for `model` with the command line's sizes, lengths and seed."""
    train = cli.override(presets.train_config(dataset, category, size=a.image_size, model=model), steps=a.steps,
                         batch_size=a.batch_size, seed=a.seed)
    projection = presets.projection_config(dataset, category, train.model.likelihood, size=train.model.size)
    projection = cli.override(projection, steps=a.proj_steps)
    return Plan(category, model, train, presets.preprocess(dataset, category, size=train.model.size), projection)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--categories", default=None,
                   help="comma-separated (default: all 15 of MVTec AD; brick,grass for --dataset textures)")
    p.add_argument("--dataset", default="mvtec_ad", choices=("mvtec_ad", "textures"),
                   help="mvtec_ad (default) or textures (the built-in data); --data-dir means your own folder")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated models to train and project (default: {','.join(MODELS)})")
    p.add_argument("--ablations", action="store_true",
                   help="also project the VAE with, one at a time: detached gradient, no weighting, no KL in the "
                        "energy, no early stopping")
    cli.add_data_flags(p, one_category=False)
    p.add_argument("--out", default=None, help="where results.md / results.csv go (default <results>/reproduce)")
    p.add_argument("--steps", type=cli.positive_int, help="training steps (default: the preset's)")
    p.add_argument("--batch-size", type=cli.positive_int, help="training batch size (default: the preset's)")
    p.add_argument("--proj-steps", type=cli.nonnegative_int, help="projection steps (default: the preset's)")
    p.add_argument("--proj-batch-size", type=cli.positive_int, default=16)
    p.add_argument("--image-size", type=cli.model_size, help="model input size (default: the preset, 128 for MVTec AD; 256 also works)")
    p.add_argument("--holdout", type=cli.fraction, help="fraction of normal training images kept for thresholds (0.1)")
    p.add_argument("--seed", type=int, default=0)
    cli.add_output_flags(p)
    p.add_argument("--keep-going", action="store_true", help="continue with the next category after an error")
    cli.add_runtime_flags(p, multi_process=False)
    a = p.parse_args(argv)
    dataset, source_dir = ("folder", a.data_dir) if a.data_dir else (a.dataset, a.manual_dir)
    default = "brick,grass" if dataset == "textures" else ",".join(MVTEC_CATEGORIES)
    categories = [c.strip() for c in (a.categories or default).split(",") if c.strip()]
    bad = [c for c in categories if c not in MVTEC_CATEGORIES] if dataset == "mvtec_ad" else []
    if bad:
        p.error(f"unknown MVTec AD categories {bad}; valid: {', '.join(MVTEC_CATEGORIES)}")
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    if not models or any(m not in MODELS for m in models):
        p.error(f"--models {a.models!r}: a comma-separated list of {', '.join(MODELS)}")
    try:
        plans = [plan(a, dataset, c, m) for c in categories for m in models]
    except ValueError as e:  # a category without a preset
        p.error(str(e))
    cli.start_runtime(a, train=plans[0].train if plans else None,
                      projection_steps=max((q.projection.steps for q in plans), default=0))
    out = Path(a.out) if a.out else Path(a.results) / "reproduce"
    meta = {"data": f"{dataset} ({source_dir or 'prepared TFDS data'})",
            "size": plans[0].train.model.size if plans else (a.image_size or 128),
            "steps": a.steps, "proj_steps": a.proj_steps, "categories": categories, "models": models,
            "ablations": a.ablations}
    done = reproduce(plans, DataConfig(dataset, "", a.tfds_dir, source_dir), out, meta, cli.threshold_config(a),
                     results=a.results, keep_going=a.keep_going, ablations=a.ablations, batch_size=a.proj_batch_size,
                     overlays=not a.no_overlays, progress=not a.no_progress)
    if done.stopped_by is not None:
        print(f"error in {done.rows[-1]['category']} {done.rows[-1]['model']}: {done.stopped_by}\n"
              "(--keep-going continues with the other categories)", file=sys.stderr)
        return cli.EXIT_ERROR
    print((out / "results.md").read_text())
    print(f"tables: {out / 'results.md'}, {out / 'results.csv'}")
    return cli.EXIT_FAILED if done.failed else cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
