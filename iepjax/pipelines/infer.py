"""Inference on a plain folder of images (no masks, no labels) with a trained run.

    summary = infer_folder(run_dir, input_dir, out_dir, DataConfig, ProjectionConfig, ThresholdConfig)

Writes into out_dir: maps/<relative path>.tiff (float32 grad map at the original size),
overlays/<relative path>.png (input | x_T | f(x0) | map | overlay at the model size), scores.csv
(file, image score = max of the map, predicted label at the run's image threshold) and summary.json.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from iepjax import outputs, presets, report, visualize
from iepjax.config import DataConfig, ProjectionConfig, ThresholdConfig
from iepjax.data.layout import IMAGE_EXTENSIONS, DataError, read_image
from iepjax.localization import localize_images
from iepjax.pipelines.project import prepare_run
from iepjax.runs import atomic_write_text


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted; hidden files and folders skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"input folder {folder} does not exist or is not a folder")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def infer_folder(run_dir: str | Path, input_dir: str | Path, out_dir: str | Path, source: DataConfig,
                 config: ProjectionConfig, thresholds: ThresholdConfig = ThresholdConfig(), *, batch_size: int = 16,
                 overlays: bool = True, progress: bool = True, chunk: int = 64, mesh=None) -> dict:
    """Maps, overlays and image scores of every image under input_dir; returns summary.json's content.

    The run's thresholds and early stopping as in `pipelines.project.project_run`, from the
    held-out images of the folder the run was trained on; the images are preprocessed as the
    run's (`preprocess.json`, else the category preset's) and processed in chunks of `chunk`, so
    memory stays bounded.
    """
    run_dir, input_dir, out_dir = Path(run_dir), Path(input_dir), Path(out_dir)
    files = list_images(input_dir)
    if not files:
        raise DataError(f"no images (.png/.jpg/.jpeg/.bmp/.tif/.tiff) found under {input_dir}")
    run = prepare_run(run_dir, dataclasses.replace(source, source_dir=None), config, thresholds,
                      batch_size=batch_size, progress=progress, mesh=mesh)
    model = run.config.model
    prep = run.prep or presets.preprocess(source.dataset, source.category, size=model.size)
    g = run.stats["grad"]
    rows = []
    panels = visualize.PanelFigure(g.vmax)
    try:
        for c0 in range(0, len(files), chunk):
            part = files[c0:c0 + chunk]
            res = localize_images(run.params, run.config, [read_image(p, model.channels) for p in part], prep,
                                  batch_size=batch_size, progress=progress, mesh=mesh)
            for i, p in enumerate(part):
                rel = p.relative_to(input_dir)
                m = res.maps["grad"][i]
                outputs.write_tiff(out_dir / "maps" / rel.with_suffix(".tiff"), m)
                score = float(m.max())
                rows.append([rel.as_posix(), f"{score:.6g}", int(score >= g.image_threshold),
                             f"{float((m >= g.pixel_threshold).mean()):.6g}", f"{m.shape[1]}x{m.shape[0]}"])
                if overlays:
                    panels.draw(out_dir / "overlays" / rel.with_suffix(".png"),
                                res.view_images[i].astype(np.float32) / 255.0, res.loc.x_T[i], res.loc.recon[i],
                                res.loc.grad_maps[i], None, f"{rel.as_posix()}  score {score:.3f}", g.pixel_threshold)
    finally:
        panels.close()
    report.write_csv(out_dir / "scores.csv", report.INFER_COLUMNS, rows)
    user = thresholds.pixel_threshold is not None or thresholds.image_threshold is not None
    summary = {"run": str(run_dir), "input_dir": str(input_dir), "n_images": len(rows),
               "n_flagged": sum(r[2] for r in rows), "image_threshold": g.image_threshold,
               "pixel_threshold": g.pixel_threshold,
               "thresholds_from": "given" if user else f"{g.n_images} held-out normal training images",
               "preprocess": prep.to_dict()}
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
