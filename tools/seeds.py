"""Train and score one category with several training seeds: how far the README's metrics move.

    python tools/seeds.py --category brick --seeds 0 1 2 3 4            # 5 runs of the first command
    python tools/seeds.py --category brick --seeds 0 1 --train-args "--steps 200"   # flags for train.py

One training run gives one draw of the metrics: the trained model moves with the seed (and with
float rounding: docs/results.md, "A model that differs only in float rounding"). For each seed S
this runs the README's first command's two scripts, `train.py --category C --seed S --results
ROOT/seed<S>` and then `project.py` on that run, in subprocesses; a seed whose folder already holds a scored projection is read, not rerun
(`--rerun` to redo it). The test split is the reported one (data seed 0) for every run: only the
training seed changes.

Prints one JSON line per seed (pixel AUROC, image AUROC, AU-PRO of the recon and grad rows, and the
pixel AUROC margin grad - recon), then one line with the mean, the sample standard deviation, the
minimum and the maximum of each over the seeds. The two scripts' own output goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRICS = ("pixel_auroc", "image_auroc", "pixel_aupro")


def _round(v) -> float | None:
    """`v` rounded to 4 places; None for a metric metrics.json holds as null (strict JSON for NaN: a
    metric that could not be computed, such as pixel AUROC without any ground-truth mask)."""
    return None if v is None else round(v, 4)


def seed_row(seed: int, metrics: dict) -> dict:
    """One seed's line: its metrics.json reduced to both rows' three metrics and the pixel AUROC margin
    (None where a metric is null)."""
    row = {"seed": seed}
    for name in ("recon", "grad"):
        row.update({f"{name}_{m}": _round(metrics[name].get(m)) for m in METRICS})
    g, r = metrics["grad"].get("pixel_auroc"), metrics["recon"].get("pixel_auroc")
    row["margin_pixel_auroc"] = None if g is None or r is None else round(g - r, 4)
    return row


def summarise(rows: list[dict]) -> dict:
    """Mean, sample std (0 for one value), min and max over the seeds of every metric of `seed_row`,
    over the seeds where it is not None; "n" counts them (all None: only n, 0)."""
    out: dict = {"seeds": [r["seed"] for r in rows]}
    for key in rows[0]:
        if key == "seed":
            continue
        v = [r[key] for r in rows if r[key] is not None]
        if not v:
            out[key] = {"n": 0}
            continue
        out[key] = {"mean": round(statistics.fmean(v), 4), "std": round(statistics.stdev(v), 4) if len(v) > 1 else 0.0,
                    "min": min(v), "max": max(v), **({"n": len(v)} if len(v) < len(rows) else {})}
    return out


def latest_metrics(root: Path, dataset: str, category: str) -> Path | None:
    """metrics.json of the latest projection of the latest run under `root` (one seed's folder), or None."""
    from iepjax import runs
    run = runs.latest_run(runs.category_dir(root, "vae", dataset, category))
    projection = runs.latest_run(run / "projections") if run is not None else None
    found = projection / "metrics.json" if projection is not None else None
    return found if found is not None and found.is_file() else None


def run_seed(a, seed: int) -> Path:
    """Train and project with this seed (unless already scored); return the projection's metrics.json."""
    root = Path(a.results) / f"seed{seed}"
    done = latest_metrics(root, a.dataset, a.category)
    if done is not None and not a.rerun:
        return done
    common = ["--dataset", a.dataset, "--category", a.category, "--results", str(root)]
    if a.tfds_dir:
        common += ["--tfds-dir", a.tfds_dir]
    for script, extra in (("train.py", ["--seed", str(seed), *shlex.split(a.train_args)]),
                          ("project.py", shlex.split(a.project_args))):
        cmd = [sys.executable, str(REPO / script), *common, *extra]
        if a.no_progress:
            cmd.append("--no-progress")
        r = subprocess.run(cmd, stdout=sys.stderr)  # the scripts' output to stderr: stdout stays JSON lines
        if r.returncode != 0:
            raise SystemExit(f"seed {seed}: {' '.join(cmd)} exited with status {r.returncode}")
    found = latest_metrics(root, a.dataset, a.category)
    if found is None:
        raise SystemExit(f"seed {seed}: project.py finished but wrote no metrics.json under {root}")
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="textures")
    p.add_argument("--category", default="brick")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--results", default="results/seeds", help="root of the runs: one folder seed<S> per seed")
    p.add_argument("--tfds-dir", default=None)
    p.add_argument("--train-args", default="", help="more train.py flags, one string")
    p.add_argument("--project-args", default="", help="more project.py flags, one string")
    p.add_argument("--rerun", action="store_true", help="train and project again where a seed is already scored")
    p.add_argument("--no-progress", action="store_true", help="passed to both scripts")
    a = p.parse_args(argv)
    rows = []
    for seed in a.seeds:
        metrics = run_seed(a, seed)
        rows.append(seed_row(seed, json.loads(metrics.read_text())))
        print(json.dumps({**rows[-1], "metrics": str(metrics)}), flush=True)
    print(json.dumps(summarise(rows)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
