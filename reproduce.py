"""Reproduce the paper's MVTec AD table: train and evaluate a list of categories, one command.

    python reproduce.py --manual-dir ~/mvtec_anomaly_detection          # all 15 MVTec AD categories
    python reproduce.py --categories carpet,bottle                      # two (already prepared)
    python reproduce.py --data-dir my_images --categories widget,gadget # own folders, same protocol

For each category: train the VAE with the category preset (iepjax/presets.py; resumes an
unfinished run), fit thresholds on held-out normal images, project the test images and score the
maps at each test image's original size (iepjax/protocol.py). Writes <out>/results.csv and
<out>/results.md (rows "recon" = VAE |x0 - f(x0)|, "grad" = VAE-grad, the projection) beside the
paper's reported means, after every category, so an interrupted run keeps what it measured.
Numbers in the table are only ever those measured here; the paper's are quoted as reported.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import sys
import time
from pathlib import Path

# Reported means of pixel AUROC over the 15 MVTec AD categories (method.md, Evaluation).
PAPER = [("VAE-grad (Dehaene et al. 2020, as listed)", 0.892), ("VAE-grad (as quoted by a later paper)", 0.86),
         ("AE-SSIM (Bergmann et al.)", 0.87), ("AE-L2", 0.82)]
COLUMNS = ("category", "kind", "status", "train_steps", "collapsed", "n_test", "recon_pixel_auroc",
           "grad_pixel_auroc", "recon_image_auroc", "grad_image_auroc", "recon_aupro", "grad_aupro",
           "skipped_pixel_images", "minutes", "run_dir", "projection_dir")


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get("status") == "ok" and r.get(key) is not None and not math.isnan(r[key])]
    return sum(vals) / len(vals) if vals else None


def write_tables(out: Path, rows: list[dict], meta: dict) -> None:
    """results.csv (one row per category) and results.md (table, means, the paper's means)."""
    from iepjax.runs import atomic_write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "results.csv", buf.getvalue())

    ok = [r for r in rows if r["status"] == "ok"]
    lines = ["# MVTec AD reproduction (iepjax)", "",
             f"Data: {meta['data']}; model input {meta['size']}x{meta['size']}; training steps "
             f"{meta['steps'] or 'per preset'}; projection steps {meta['proj_steps'] or 'per preset'}; "
             f"{len(ok)} of {len(meta['categories'])} categories evaluated.", "",
             "Metrics on anomaly maps at each test image's original size: pixel AUROC (all pixels of the "
             "category pooled), image AUROC (max of the map), AU-PRO up to FPR 0.3 (normalised). "
             "recon = VAE, map |x0 - f(x0)|; grad = VAE-grad, map |x_T - x0| after the projection.", "",
             "| category | kind | pixel AUROC recon | pixel AUROC grad | image AUROC recon | image AUROC grad "
             "| AU-PRO recon | AU-PRO grad | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = r["status"] if r["status"] != "ok" else ("collapsed to the mean" if r.get("collapsed") else "")
        if r.get("skipped_pixel_images"):
            note = (note + "; " if note else "") + f"{r['skipped_pixel_images']} image(s) without masks skipped"
        lines.append(f"| {r['category']} | {r.get('kind', '')} | {_fmt(r.get('recon_pixel_auroc'))} | "
                     f"{_fmt(r.get('grad_pixel_auroc'))} | {_fmt(r.get('recon_image_auroc'))} | "
                     f"{_fmt(r.get('grad_image_auroc'))} | {_fmt(r.get('recon_aupro'))} | "
                     f"{_fmt(r.get('grad_aupro'))} | {note} |")
    keys = ("recon_pixel_auroc", "grad_pixel_auroc", "recon_image_auroc", "grad_image_auroc", "recon_aupro",
            "grad_aupro")
    lines.append(f"| **mean ({len(ok)})** | | " + " | ".join(_fmt(_mean(rows, k)) for k in keys) + " | |")
    lines += ["", "## Beside the paper (mean pixel AUROC over categories)", "",
              "| method | mean pixel AUROC | source |", "|---|---|---|",
              f"| VAE (recon), this run | {_fmt(_mean(rows, 'recon_pixel_auroc'))} | measured here, {len(ok)} categories |",
              f"| VAE-grad, this run | {_fmt(_mean(rows, 'grad_pixel_auroc'))} | measured here, {len(ok)} categories |"]
    lines += [f"| {name} | {v:.3f} | reported, 15 categories |" for name, v in PAPER]
    lines += ["", "The paper's per-category values are not available here, so only means are compared. "
              "A mean over fewer than 15 categories is not comparable with the paper's."]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")


def train_config(a, dataset: str, category: str):
    """The category's TrainConfig: its preset, with the command line's --image-size, --steps, --batch-size."""
    from iepjax.config import ModelConfig, TrainConfig
    from iepjax.presets import preset

    pre = preset(dataset, category)
    model = ModelConfig(size=a.image_size or pre["size"], channels=pre["channels"], likelihood=pre["likelihood"],
                        decoder=pre["decoder"])
    return TrainConfig(model=model, steps=a.steps or pre["train_steps"], batch_size=a.batch_size or pre["batch_size"],
                       learning_rate=pre["learning_rate"], seed=a.seed, augment=pre.get("augment", True))


def run_category(a, category: str, dataset: str, source_dir: str | None) -> dict:
    """Train (or resume) and evaluate one category; returns its table row."""
    from iepjax import evaluation, sharding, training
    from iepjax.data.preprocess import from_preset

    t0 = time.time()
    tcfg = train_config(a, dataset, category)
    prep = from_preset(dataset, category, size=tcfg.model.size)
    mesh = sharding.make_mesh(divides=tcfg.batch_size)  # one CPU device per core (see main), None on one device
    run_dir, summary = training.train_run(tcfg, dataset, category, results=a.results, data_dir=a.tfds_dir,
                                          holdout=a.holdout, progress=not a.no_progress, source_dir=source_dir,
                                          prep=prep, mesh=mesh)
    pcfg = evaluation.default_projection_config(dataset, category, summary.config.model)
    if a.proj_steps is not None:
        pcfg = dataclasses.replace(pcfg, steps=a.proj_steps)
    proj_dir, res = evaluation.project_run(run_dir, dataset, category, pcfg, data_dir=a.tfds_dir,
                                           batch_size=a.proj_batch_size, overlays=not a.no_overlays,
                                           progress=not a.no_progress, source_dir=source_dir, mesh=mesh)
    row = {"category": category, "kind": prep.kind, "status": "ok", "train_steps": tcfg.steps,
           "collapsed": bool(summary.collapse.collapsed), "n_test": res.get("protocol", {}).get("n_images"),
           "skipped_pixel_images": len(res.get("protocol", {}).get("skipped_pixel_metrics", [])),
           "minutes": round((time.time() - t0) / 60, 2), "run_dir": str(run_dir), "projection_dir": str(proj_dir)}
    for r in ("recon", "grad"):
        row[f"{r}_pixel_auroc"] = res[r]["pixel_auroc"]
        row[f"{r}_image_auroc"] = res[r]["image_auroc"]
        row[f"{r}_aupro"] = res[r]["pixel_aupro"]
    return row


def main(argv=None) -> int:
    from iepjax.data.layout import MVTEC_CATEGORIES

    from iepjax.cli import fraction, model_size, nonnegative_int, positive_int

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--categories", default=",".join(MVTEC_CATEGORIES), help="comma-separated (default: all 15)")
    p.add_argument("--manual-dir", default=None,
                   help="MVTec AD download (extracted folder or .tar.xz); needed while a category is not prepared")
    p.add_argument("--data-dir", default=None, help="own images in the MVTec AD layout instead of MVTec AD")
    p.add_argument("--tfds-dir", default=None, help="where TFDS keeps prepared data")
    p.add_argument("--results", default="results", help="root of the run folders")
    p.add_argument("--out", default=None, help="where results.md / results.csv go (default <results>/reproduce)")
    p.add_argument("--steps", type=positive_int, help="training steps (default: the preset's)")
    p.add_argument("--batch-size", type=positive_int, help="training batch size (default: the preset's)")
    p.add_argument("--proj-steps", type=nonnegative_int, help="projection steps (default: the preset's)")
    p.add_argument("--proj-batch-size", type=positive_int, default=16)
    p.add_argument("--image-size", type=model_size, help="model input size (default 128; 256 also works)")
    p.add_argument("--holdout", type=fraction, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-overlays", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--keep-going", action="store_true", help="continue with the next category after an error")
    p.add_argument("--cpu-devices", type=positive_int, default=None,
                   help="on CPU: JAX devices to split the cores into (default: one per core, as train.py)")
    a = p.parse_args(argv)
    from iepjax import distributed
    distributed.use_cpu_cores(a.cpu_devices)  # before any JAX computation
    dataset = "folder" if a.data_dir else "mvtec_ad"
    source_dir = a.data_dir or a.manual_dir
    categories = [c.strip() for c in a.categories.split(",") if c.strip()]
    if dataset == "mvtec_ad":
        bad = [c for c in categories if c not in MVTEC_CATEGORIES]
        if bad:
            p.error(f"unknown MVTec AD categories {bad}; valid: {', '.join(MVTEC_CATEGORIES)}")
    if categories:  # large training steps on CPU: freed host memory kept for reuse (before any JAX work)
        from iepjax import hostmem
        hostmem.for_training(train_config(a, dataset, categories[0]), distributed.cpu_devices_chosen())
    out = Path(a.out) if a.out else Path(a.results) / "reproduce"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"data": f"{dataset} ({source_dir or 'prepared TFDS data'})", "size": a.image_size or 128,
            "steps": a.steps, "proj_steps": a.proj_steps, "categories": categories}
    rows: list[dict] = []
    failed = 0
    for category in categories:
        print(f"=== {category} ===", file=sys.stderr)
        try:
            rows.append(run_category(a, category, dataset, source_dir))
        except Exception as e:  # noqa: BLE001 - recorded in the table, re-raised unless --keep-going
            failed += 1
            rows.append({"category": category, "status": f"error: {type(e).__name__}: {e}".replace("|", "/")[:300]})
            write_tables(out, rows, meta)
            if not a.keep_going:
                print(f"error in {category}: {e}\n(--keep-going continues with the other categories)", file=sys.stderr)
                return 2
        write_tables(out, rows, meta)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    print((out / "results.md").read_text())
    print(f"tables: {out / 'results.md'}, {out / 'results.csv'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
