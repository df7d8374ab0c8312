"""Scoring anomaly maps against the ground truth, and the official MVTec AD protocol (docs/method.md, Evaluation).

* `score`: pixel AUROC, image AUROC (score = max of the map, or the `MapConfig`'s image score,
  with the max's AUROC kept as "image_auroc_max") and AU-PRO up to FPR 0.3 of one set of maps
  (`iepjax.metrics`, `iepjax.calibrated_maps`).
* `official_metrics`: the same on maps at each test image's **original size**: pixel AUROC
  pooled over all pixels of the category (good images included), image AUROC, AU-PRO up to FPR
  0.3 divided by 0.3. Defect images of a kind without ground-truth masks are left out of the
  pixel metrics (and listed); they still count for the image AUROC.
* `split_metrics`: the metrics.json of a projection: both rows, the F1 and false-positive rates
  at the thresholds, how the thresholds were chosen, and the timing.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from iepjax import calibrated_maps, metrics
from iepjax.config import MapConfig

ROWS = ("recon", "grad")


def _evaluate(maps, masks, labels, map_cfg: MapConfig, pixel_t: float | None) -> dict:
    """`metrics.evaluate` with `map_cfg`'s image score; with another score than the max, the max's
    image AUROC too ("image_auroc_max")."""
    if map_cfg.image_score == "max":
        return metrics.evaluate(maps, masks, labels)
    out = metrics.evaluate(maps, masks, labels, image_score=lambda m: calibrated_maps.image_score(m, map_cfg, pixel_t))
    out["image_auroc_max"] = metrics.image_auroc(metrics.image_scores(maps), np.asarray(labels).ravel())
    return out


def score(maps_NxHxW: np.ndarray, masks_NxHxW: np.ndarray, labels_N: np.ndarray, map_cfg: MapConfig = MapConfig(),
          pixel_t: float | None = None) -> dict:
    """pixel AUROC, image AUROC (`map_cfg.image_score`, default max of map; `pixel_t`: the pixel
    threshold, for "area"), AU-PRO@0.3 of one set of maps; pixel metrics NaN when there are no
    ground-truth masks at all."""
    if not any(np.any(m) for m in masks_NxHxW):
        masks_NxHxW = [None] * len(labels_N)
    return _evaluate(maps_NxHxW, masks_NxHxW, labels_N, map_cfg, pixel_t)


def rates(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray, pixel_t: float, image_t: float,
          map_cfg: MapConfig = MapConfig()) -> dict:
    """F1 and false-positive rates of the thresholded maps (pixel: map >= t; image: score >= t,
    the score `map_cfg.image_score`)."""
    img = calibrated_maps.image_scores(maps, map_cfg, pixel_t)
    good = labels == 0
    return {"image_f1": metrics.f1_at_threshold(img, labels, image_t),
            "pixel_f1": metrics.f1_at_threshold(np.asarray(maps).ravel(), np.asarray(masks).ravel(), pixel_t),
            "pixel_fpr_good_test": float(np.mean(maps[good] >= pixel_t)) if good.any() else float("nan"),
            "image_fpr_good_test": float(np.mean(img[good] >= image_t)) if good.any() else float("nan")}


def split_metrics(loc, test, stats: dict, source: str, *, official: dict | None = None,
                  compiled_in_calibration: float | None = None, map_cfg: MapConfig = MapConfig()) -> dict:
    """The metrics of a labelled split's localisation (`localization.Localization` of `test`, an
    `iepjax.data.Split` at the model size) at the thresholds `stats` ({"grad", "recon"} ->
    `thresholds.NormalStats`; `source`: where they come from).

    `official`: `official_metrics` of the original-size maps, which replace the model-size ones
    in the rows (those are kept under "model_size"). `compiled_in_calibration`: the compile
    seconds of a threshold calibration run just before in this process (the test pass then
    reuses the compiled program), reported as the compile time. `map_cfg`: the map and image
    score the maps and thresholds are of (recorded as "map").
    """
    result = {row: score(getattr(loc, f"{row}_maps"), test.masks, test.labels, map_cfg, stats[row].pixel_threshold)
              for row in ROWS}
    if official is not None:
        result["model_size"] = {row: dict(result[row]) for row in ROWS}
        for row in ROWS:
            result[row].update(official[row])
        result["protocol"] = official["protocol"]
        result["per_kind"] = official["per_kind"]
    for row, maps in (("grad", loc.grad_maps), ("recon", loc.recon_maps)):
        st = stats[row]
        result[row].update(rates(maps, test.masks, test.labels, st.pixel_threshold, st.image_threshold, map_cfg))
        result[row]["pixel_threshold"] = st.pixel_threshold
        result[row]["image_threshold"] = st.image_threshold
    g = stats["grad"]
    result["map"] = map_cfg.score_record()
    result["thresholds"] = {"source": source, "pixel_quantile": g.pixel_quantile, "image_quantile": g.image_quantile,
                            "n_normal_images": g.n_images}
    # the images after the first batch (in model inputs: a tiled image's tiles may span batches)
    n_steady = len(test.images) * (1.0 - loc.first_share)
    result["timing"] = {"compile_s": round(loc.compile_s, 2), "total_s": round(loc.run_s, 2),
                        "steady_img_per_s": (round(n_steady / max(loc.run_s - loc.compile_s, 1e-9), 3)
                                             if n_steady > 0 else None)}
    if compiled_in_calibration is not None:  # the first test batch found the program compiled
        result["timing"].update(compile_s=round(compiled_in_calibration, 2), compiled_in="threshold calibration",
                                first_batch_s=round(loc.compile_s, 2))
    return result


def official_metrics(maps: dict, test, map_cfg: MapConfig = MapConfig(), pixel_t: dict | None = None) -> dict:
    """{"recon", "grad"} -> {pixel_auroc, image_auroc, pixel_aupro} on the original-size maps, plus
    "per_kind" and "protocol" (what was measured, and which images were left out of the pixel metrics).
    Image scores `map_cfg.image_score` (`pixel_t`: {row: pixel threshold}, for "area")."""
    masks = test.mask_or_none()
    pixel_t = pixel_t or {}
    skipped = [i for i, (m, y) in zip(test.ids, zip(masks, test.labels)) if m is None and y == 1]
    out = {row: _evaluate(maps[row], masks, test.labels, map_cfg, pixel_t.get(row)) for row in ROWS}
    out["per_kind"] = per_kind_metrics(maps, masks, test.labels, test.defect_types, map_cfg, pixel_t)
    sizes = sorted({tuple(np.shape(m)) for m in maps["grad"]})
    out["protocol"] = {
        "maps": "original image size (bilinear upsampling of the model-size / stitched maps)",
        "pixel_auroc": "all pixels of all test images of the category pooled, good images included",
        "image_auroc": f"image score = {map_cfg.image_score} of the {map_cfg.kind} map",
        "pixel_aupro": "AU-PRO, FPR limit 0.3, normalised by 0.3",
        "n_images": len(test.ids), "n_pixels": int(sum(np.size(m) for m in maps["grad"])),
        "image_sizes": [list(s) for s in sizes[:10]],
        "skipped_pixel_metrics": skipped,
    }
    if skipped:
        kinds = sorted({i.split("/")[0] for i in skipped})
        out["protocol"]["note"] = (f"{len(skipped)} defect image(s) of kind(s) {', '.join(kinds)} have no ground-truth "
                                   "mask: left out of pixel AUROC and AU-PRO, kept for image AUROC")
    return out


def per_kind_metrics(maps: dict, masks: Sequence, labels, kinds: Sequence[str], map_cfg: MapConfig = MapConfig(),
                     pixel_t: dict | None = None) -> dict:
    """{kind: {"n_images", "recon": {...}, "grad": {...}}}: `metrics.evaluate` on the good images
    together with the images of one defect kind, for each kind (MVTec AD's per-defect-type view)."""
    pixel_t = pixel_t or {}
    labels = np.asarray(labels)
    out = {}
    for kind in sorted({k for k, y in zip(kinds, labels) if y == 1}):
        idx = [i for i, k in enumerate(kinds) if labels[i] == 0 or k == kind]
        out[kind] = {"n_images": int(sum(k == kind for k in kinds))}
        for row in ROWS:
            out[kind][row] = _evaluate([maps[row][i] for i in idx], [masks[i] for i in idx], labels[idx], map_cfg,
                                       pixel_t.get(row))
    return out
