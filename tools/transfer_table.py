"""The transfer check: defaults chosen on some categories, scored on others ("chosen on -> scored on").

    python tools/transfer_table.py                         # every built-in category with a trained run
    python tools/transfer_table.py --categories weave tissue_gray --json transfer.json

For each category with a trained run under --results, and each map (the paper's and the
normal-calibrated one, each with its default image score, and the max on the same maps), and each parametrisation of the projection's alpha and lam (`--projections`:
"relative", the preset's step and hold resolved in the model's own units on the run's held-out
normal images, the default; "fixed", the constants they give on the brick model), it runs `pipelines.project_run` (what
project.py runs) and prints one row: pixel AUROC, AU-PRO, image AUROC (the setting's image
score, and the max) for recon and grad, and the alpha and lam used.

The defaults were chosen on data seed 1 (the calibration split, docs/calibration.md) of brick
and grass, and of weave and tissue_gray for the projection's step and hold and the image score:
those rows say "chosen on". Seed 0 (the reported split) of every category, and every seed of
tissue, was never used for a choice: "scored only".
Every call writes a projection folder into the run, like project.py (without overlays).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

CATEGORIES = ("brick", "grass", "tissue_gray", "weave", "tissue")
# (category, data seed) the defaults were chosen on (docs/calibration.md)
CHOSEN_ON = {("brick", 1), ("grass", 1), ("weave", 1), ("tissue_gray", 1)}
MAPS = ("paper", "nce")  # config.MAP_KINDS, each with its default image score (config.default_map)
PROJECTIONS = ("relative", "fixed")


def role(category: str, seed: int) -> str:
    """"chosen on" for the calibration splits the defaults were chosen on, else "scored only"."""
    return "chosen on" if (category, seed) in CHOSEN_ON else "scored only"


def format_table(rows: list[dict]) -> str:
    """A markdown table of the rows (one per category, seed and map)."""
    head = ("| category | seed | role | map (image score) | projection (alpha, lam) | recon pixel | recon AU-PRO | recon image | recon image (max) "
            "| grad pixel | grad AU-PRO | grad image | grad image (max) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [r["category"], str(r["seed"]), r["role"], f"{r['map']} ({r['image_score']})",
                 f"{r['parametrisation']} ({r['alpha']:.3g}, {r['lam']:.3g})"]
        for row in ("recon", "grad"):
            m = r[row]
            cells += [f"{m['pixel_auroc']:.3f}", f"{m['pixel_aupro']:.3f}", f"{m['image_auroc']:.3f}",
                      f"{m.get('image_auroc_max', m['image_auroc']):.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="results")
    p.add_argument("--tfds-dir", default=None)
    p.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    p.add_argument("--maps", nargs="+", default=list(MAPS), choices=list(MAPS))
    p.add_argument("--projections", nargs="+", default=["relative"], choices=PROJECTIONS,
                   help="alpha and lam: resolved in the model's units (relative, the default) and/or the constants "
                        "they give on the brick model (fixed)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="data seeds (default: 1 and 0 for the categories defaults were chosen on, 0 for the others)")
    p.add_argument("--defect-kinds", default="default", choices=("default", "detail", "all"),
                   help="the test split's defects: the default split's kinds, the detail-loss kinds (blur, smooth, "
                        "lost_texture) or every kind; the latter two are other splits of the same region")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--cpu-devices", type=int, default=None, help="on CPU: JAX devices (default: one per core)")
    a = p.parse_args(argv)

    from iepjax import cpu_runtime
    cpu_runtime.use_cpu_cores(a.cpu_devices)  # before any JAX computation
    from iepjax import runs, sharding
    from iepjax.config import DataConfig, ThresholdConfig, default_map
    from iepjax import presets
    from iepjax.data import defects
    from iepjax.pipelines import project_run

    mesh = sharding.make_mesh()
    test_split = {"default": None, "detail": {"defect_kinds": defects.DETAIL_LOSS_KINDS},
                  "all": {"defect_kinds": defects.DEFECT_KINDS}}[a.defect_kinds]
    rows = []
    for category in a.categories:
        try:
            run_dir = runs.find_run(a.results, "vae", "textures", category, None)
        except (ValueError, OSError) as e:
            print(f"{category}: no trained run ({e}); train it with `python train.py --category {category}`",
                  file=sys.stderr)
            continue
        seeds = a.seeds or ([1, 0] if any(c == category for c, _ in CHOSEN_ON) else [0])
        for name, param in [(n, q) for n in a.maps for q in a.projections]:  # the seeds inside: one fit per setting
            thresholds = ThresholdConfig(map=default_map(name))
            config = presets.projection_config("textures", category)
            if param == "fixed":
                config = dataclasses.replace(config, step=None, hold=None)
            for seed in seeds:
                out, m = project_run(run_dir, DataConfig("textures", category, a.tfds_dir), config, thresholds,
                                     overlays=False, progress=False, mesh=mesh, data_seed=seed, test_split=test_split)
                used = json.loads((out / "projection_config.json").read_text())
                row = {"category": category, "seed": seed, "role": role(category, seed), "map": name,
                       "image_score": thresholds.map.image_score, "topk_frac": thresholds.map.topk_frac,
                       "parametrisation": param, "alpha": used["alpha"],
                       "lam": used["lam"], "defect_kinds": a.defect_kinds, "run": str(run_dir), "projection": str(out),
                       "per_kind": {k: {r: v[r]["pixel_auroc"] for r in ("recon", "grad")} for k, v in m["per_kind"].items()},
                       **{r: {k: m[r][k] for k in ("pixel_auroc", "pixel_aupro", "image_auroc", "image_auroc_max")
                              if k in m[r]} for r in ("recon", "grad")}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    rows.sort(key=lambda r: (r["role"] != "chosen on", r["seed"] != 1, r["category"], r["map"], r["parametrisation"]))
    print(format_table(rows))
    if a.json:
        from iepjax.atomic import dumps_json
        from iepjax.runs import atomic_write_text
        atomic_write_text(a.json, dumps_json(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
