"""The official MVTec AD evaluation protocol on top of `iepjax.evaluation` (method.md, Evaluation).

* Each test image goes through `iepjax.data.preprocess` (objects: resized; textures: tiled at
  the training scale), is projected, and its "recon" and "grad" maps are brought back to the
  image's **original size** (bilinear).
* Metrics on the original-size maps: pixel AUROC pooled over all pixels of the category (good
  images included), image AUROC (score = max of the map), AU-PRO up to FPR 0.3, divided by 0.3.
  Defect images of a kind without ground-truth masks are left out of the pixel metrics (and
  listed in metrics.json); they still count for the image AUROC.
* Float32 TIFF maps ``<out>/<category>/test/<defect>/<id>.tiff``: the layout the official
  MVTec AD evaluator reads (``<out>`` = ``anomaly_maps/grad`` and ``anomaly_maps/recon`` of a
  projection folder).
* A "view" of the split at the model size (size x size images, maps, x_T) for the pictures,
  thresholds and the HTML report of `iepjax.evaluation.evaluate`.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from iepjax.data.preprocess import Preprocess, model_inputs, resize_images, resize_map, resize_masks, stitch

ROWS = ("recon", "grad")


class Localized(NamedTuple):
    """Result of `localize_images`.

    view_images: (N, size, size, C) uint8 (the inputs resized, for pictures);
    loc: an `evaluation.Localization` at the view size (maps, x_T, f(x0) resized from the
    stitched working-resolution outputs; energies averaged over an image's tiles);
    maps: {"grad", "recon"} -> list of (H_i, W_i) float32 maps at each image's original size.
    """

    view_images: np.ndarray
    loc: object
    maps: dict


def localize_images(params: dict, config, images: np.ndarray | Sequence[np.ndarray], prep: Preprocess, *,
                    batch_size: int = 16, progress: bool = True, mesh=None) -> Localized:
    """Project images of any size the way `prep` says; maps at the original sizes and a model-size view."""
    from iepjax.evaluation import Localization, localize

    inputs, layouts = model_inputs(images, prep)
    loc = localize(params, inputs, config, batch_size=batch_size, progress=progress, mesh=mesh)  # issue 6: mesh
    s = prep.size
    view = {"grad_maps": [], "recon_maps": [], "x_T": [], "recon": []}
    maps = {"grad": [], "recon": []}
    energies = []
    for lay in layouts:
        for row, field in (("grad", "grad_maps"), ("recon", "recon_maps")):
            work = stitch(getattr(loc, field), lay)
            maps[row].append(resize_map(work, lay.orig_hw))
            view[field].append(resize_map(work, (s, s)))
        for field in ("x_T", "recon"):
            view[field].append(resize_map(stitch(getattr(loc, field), lay), (s, s)))
        energies.append(np.asarray(loc.energies[lay.start:lay.start + len(lay.positions)]).mean(0))
    view_loc = Localization(**{k: np.stack(v) for k, v in view.items()},
                            energies=np.stack(energies), compile_s=loc.compile_s, run_s=loc.run_s)
    return Localized(resize_images(images, s), view_loc, maps)


def view_split(test, view_images: np.ndarray, size: int):
    """The split at the model size (masks resized; a defect without mask keeps an all-zero view mask)."""
    return test._replace(images=view_images, masks=resize_masks(test.masks, size))


def official_metrics(maps: dict, test) -> dict:
    """{"recon", "grad"} -> {pixel_auroc, image_auroc, pixel_aupro} on the original-size maps, plus "protocol"."""
    from iepjax import metrics

    masks = test.mask_or_none()
    skipped = [i for i, (m, y) in zip(test.ids, zip(masks, test.labels)) if m is None and y == 1]
    out = {row: metrics.evaluate(maps[row], masks, test.labels) for row in ROWS}
    out["per_kind"] = per_kind_metrics(maps, masks, test.labels, test.defect_types)
    sizes = sorted({tuple(np.shape(m)) for m in maps["grad"]})
    out["protocol"] = {
        "maps": "original image size (bilinear upsampling of the model-size / stitched maps)",
        "pixel_auroc": "all pixels of all test images of the category pooled, good images included",
        "image_auroc": "image score = max of the map",
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


def per_kind_metrics(maps: dict, masks: Sequence, labels, kinds: Sequence[str]) -> dict:
    """{kind: {"n_images", "recon": {...}, "grad": {...}}}: `metrics.evaluate` on the good images
    together with the images of one defect kind, for each kind (MVTec AD's per-defect-type view)."""
    from iepjax import metrics

    labels = np.asarray(labels)
    out = {}
    for kind in sorted({k for k, y in zip(kinds, labels) if y == 1}):
        idx = [i for i, k in enumerate(kinds) if labels[i] == 0 or k == kind]
        out[kind] = {"n_images": int(sum(k == kind for k in kinds))}
        for row in ROWS:
            out[kind][row] = metrics.evaluate([maps[row][i] for i in idx], [masks[i] for i in idx], labels[idx])
    return out


def tiff_path(root: str | Path, category: str, id_: str) -> Path:
    """<root>/<category>/test/<defect>/<stem>.tiff for an id "<defect>/<stem>"."""
    defect, _, stem = id_.partition("/")
    return Path(root) / category / "test" / defect / f"{stem}.tiff"


def write_tiffs(root: str | Path, category: str, ids: list[str], maps: Sequence[np.ndarray]) -> list[Path]:
    """Float32 TIFF anomaly maps in the official evaluator's layout; returns the paths."""
    import tifffile

    paths = []
    for id_, m in zip(ids, maps):
        p = tiff_path(root, category, id_)
        p.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(p, np.asarray(m, dtype=np.float32))
        paths.append(p)
    return paths


def write_maps(out_dir: Path, category: str, test, maps: dict) -> dict:
    """Write anomaly_maps/<row>/<category>/test/<defect>/<id>.tiff for both rows; returns {row: root}."""
    roots = {}
    for row in ROWS:
        root = Path(out_dir) / "anomaly_maps" / row
        write_tiffs(root, category, test.ids, maps[row])
        roots[row] = str(root)
    return roots


def warn_skipped(official: dict) -> None:
    note = official.get("protocol", {}).get("note")
    if note:
        print(f"note: {note}", file=sys.stderr)


# --------------------------------------------------------------------------- plain folders (no labels)


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted; hidden files and folders skipped."""
    from iepjax.data.layout import IMAGE_EXTENSIONS
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"input folder {folder} does not exist or is not a folder")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def infer_folder(run_dir: str | Path, input_dir: str | Path, out_dir: str | Path, config, *,
                 dataset: str, category: str, data_dir: str | None = None, batch_size: int = 16, overlays: bool = True, progress: bool = True,
                 pixel_threshold: float | None = None, image_threshold: float | None = None,
                 pixel_quantile: float = 0.995, image_quantile: float = 0.99, chunk: int = 64,
                 early_stop: bool = True) -> dict:
    """Maps, overlays and image scores of every image under input_dir (no masks or labels needed).

    Writes into out_dir: maps/<relative path>.tiff (float32 grad map at the original size),
    overlays/<relative path>.png (input | map | overlay at the model size), scores.csv (file,
    image score = max of the map, predicted label from the run's image threshold) and summary.json.
    Images are processed in chunks of `chunk` so memory stays bounded. `early_stop`: as in
    `evaluation.project_run`.
    """
    import csv
    import dataclasses
    import io
    import json

    import tifffile

    from iepjax import evaluation, visualize
    from iepjax.data.layout import DataError, read_image
    from iepjax.runs import atomic_write_text
    from iepjax.training import load_params

    run_dir, input_dir, out_dir = Path(run_dir), Path(input_dir), Path(out_dir)
    files = list_images(input_dir)
    if not files:
        raise DataError(f"no images (.png/.jpg/.jpeg/.bmp/.tif/.tiff) found under {input_dir}")
    params, tcfg = load_params(run_dir)
    config = dataclasses.replace(config, model=tcfg.model)
    prep = run_preprocess(run_dir, dataset, category, tcfg.model.size)
    normal = evaluation.held_out_images(run_dir, dataset, category, data_dir)
    if early_stop and config.stop_loss is None:
        config = evaluation.with_early_stop(params, config, normal, Preprocess.load(run_dir))
    thresholds, _ = evaluation.load_or_calibrate(
        run_dir, params, config, normal,
        batch_size=batch_size, progress=progress, pixel_quantile=pixel_quantile, image_quantile=image_quantile)
    g = thresholds["grad"]
    pt = g.pixel_threshold if pixel_threshold is None else pixel_threshold
    it = g.image_threshold if image_threshold is None else image_threshold
    rows = []
    panels = visualize.PanelFigure(g.vmax)
    try:
        for c0 in range(0, len(files), chunk):
            part = files[c0:c0 + chunk]
            images = [read_image(p, tcfg.model.channels) for p in part]
            res = localize_images(params, config, images, prep, batch_size=batch_size, progress=progress)
            for i, p in enumerate(part):
                rel = p.relative_to(input_dir)
                m = res.maps["grad"][i]
                tpath = out_dir / "maps" / rel.with_suffix(".tiff")
                tpath.parent.mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(tpath, m.astype(np.float32))
                score = float(m.max())
                rows.append([rel.as_posix(), f"{score:.6g}", int(score >= it), f"{float((m >= pt).mean()):.6g}",
                             f"{m.shape[1]}x{m.shape[0]}"])
                if overlays:
                    panels.draw(out_dir / "overlays" / rel.with_suffix(".png"),
                                res.view_images[i].astype(np.float32) / 255.0, res.loc.x_T[i], res.loc.recon[i],
                                res.loc.grad_maps[i], None, f"{rel.as_posix()}  score {score:.3f}", pt)
    finally:
        panels.close()
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["file", "image_score", "pred_label", "area_above_pixel_threshold", "size"])
    w.writerows(rows)
    atomic_write_text(out_dir / "scores.csv", buf.getvalue())
    summary = {"run": str(run_dir), "input_dir": str(input_dir), "n_images": len(rows),
               "n_flagged": sum(r[2] for r in rows), "image_threshold": it, "pixel_threshold": pt,
               "thresholds_from": "given" if (pixel_threshold is not None or image_threshold is not None)
               else f"{g.n_images} held-out normal training images",
               "preprocess": prep.to_dict()}
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def run_preprocess(run_dir: str | Path, dataset: str, category: str, size: int) -> Preprocess:
    """The run's stored preprocessing (preprocess.json), else the category preset's at the model size."""
    from iepjax.data.preprocess import from_preset
    return Preprocess.load(run_dir) or from_preset(dataset, category, size=size)
