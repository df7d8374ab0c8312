"""Pixel and image AUROC of each defect kind, from a projection folder's maps; one JSON line per kind.

    python tools/per_kind.py --category brick                 # the latest run's latest projection
    python tools/per_kind.py --projection results/vae/textures/brick/v0/projections/v0

For each defect kind, the good test images and the images of that kind are pooled (as the paper's
per-category AUROC pools a category): pixel AUROC over their pixels, image AUROC from each map's
maximum, for the recon and grad rows. Reads the model-size maps of `maps.npz` (the ones
`project.py` stores) and the test split's masks resized to that size, so the numbers are those
of metrics.json's "model_size" view, split by kind. The README's per-kind figures come from here.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="textures")
    p.add_argument("--category", default="brick")
    p.add_argument("--results", default="results")
    p.add_argument("--run", default=None, help="run folder (default: the category's latest)")
    p.add_argument("--projection", default=None, help="projection folder (default: the run's newest)")
    p.add_argument("--tfds-dir", default=None)
    a = p.parse_args(argv)

    import numpy as np
    from sklearn.metrics import roc_auc_score

    from iepjax import data, runs
    from iepjax.data.preprocess import resize_masks

    if a.projection:
        proj = Path(a.projection)
    else:
        found = sorted((runs.find_run(a.results, "vae", a.dataset, a.category, a.run) / "projections").glob("v*"),
                       key=lambda q: int(q.name[1:]) if q.name[1:].isdigit() else -1)
        if not found:
            p.error("the run has no projection yet: run project.py first")
        proj = found[-1]
    maps = np.load(proj / "maps.npz")
    test = data.load_split(a.dataset, a.category, "test", a.tfds_dir, progress=False)
    order = [test.ids.index(i) for i in maps["ids"]]
    masks = resize_masks(test.masks, maps["grad"].shape[1])[order] > 0
    kinds = np.array([test.defect_types[i] for i in order])
    for kind in sorted(set(kinds) - {"good"}):
        sel = (kinds == "good") | (kinds == kind)
        row = {"projection": str(proj), "kind": kind, "n_images": int((kinds == kind).sum())}
        for r in ("recon", "grad"):
            m = maps[r][sel]
            row[r] = {"pixel_auroc": round(float(roc_auc_score(masks[sel].ravel(), m.ravel())), 4),
                      "image_auroc": round(float(roc_auc_score(kinds[sel] == kind, m.reshape(len(m), -1).max(1))), 4)}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
