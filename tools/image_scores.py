"""Image AUROC of every image score on the maps of one projection folder (docs/calibration.md).

    python tools/image_scores.py results/vae/textures/brick/latest/projections/v3

Reads the TIFF maps at the original image sizes (anomaly_maps/<row>/...) that project.py wrote,
the labels from their ids (defect kind "good" is normal) and the pixel thresholds of the
folder's thresholds.json (for "area"), and prints one JSON line per row: the image AUROC of max,
topk (0.1 %, 0.5 %, 2 %), smoothed_max (sigma 2, 4, 8 px) and area. Use it on a calibration split
(project_run's data_seed 1, tools/transfer_table.py), never to choose on the reported split.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

SCORES = {"max": {}, "topk 0.1%": {"topk_frac": 0.001}, "topk 0.5%": {"topk_frac": 0.005},
          "topk 2%": {"topk_frac": 0.02}, "smoothed_max 2": {"smoothed_max_sigma": 2.0},
          "smoothed_max 4": {"smoothed_max_sigma": 4.0}, "smoothed_max 8": {"smoothed_max_sigma": 8.0}, "area": {}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("projection", help="a projection folder <run>/projections/v<N>")
    a = p.parse_args(argv)
    import tifffile

    from iepjax import calibrated_maps, metrics
    from iepjax.config import MapConfig

    folder = Path(a.projection)
    stored = json.loads((folder / "thresholds.json").read_text())
    result = json.loads((folder / "metrics.json").read_text())
    for row in ("recon", "grad"):
        paths = sorted((folder / "anomaly_maps" / row).rglob("*.tiff"))
        if not paths:
            print(f"error: no TIFF maps under {folder / 'anomaly_maps' / row}", file=sys.stderr)
            return 2
        maps = [tifffile.imread(q) for q in paths]
        labels = np.array([0 if q.parent.name == "good" else 1 for q in paths])
        out = {"projection": str(folder), "row": row, "map": stored.get("map"), "data_seed": result.get("data_seed", 0)}
        for name, kw in SCORES.items():
            kind = name.split()[0]
            cfg = MapConfig(image_score=kind, **kw)
            s = calibrated_maps.image_scores(maps, cfg, stored[row]["pixel_threshold"])
            out[name] = round(metrics.image_auroc(s, labels), 4)
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
