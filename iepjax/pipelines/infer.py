"""Inference on a plain folder of images (no masks, no labels) with a trained run.

    out_dir, summary = infer_folder(run_dir, input_dir, DataConfig, ProjectionConfig, ThresholdConfig)

Every readable image file under input_dir (recursively) gets, under its path relative to input_dir
with its whole file name kept (`output_name`: x.png and x.jpg never share an output):

    maps/<relative path>.tiff      float32 grad map at the original size, e.g. maps/line2/x.png.tiff
    overlays/<relative path>.png   input | x_T | f(x0) | map | overlay at the model size
    a row of scores.csv            file, image score (ThresholdConfig.map's), predicted label at the run's
                                   image threshold, share of pixels above the pixel threshold, size

A file that cannot be read as an image (truncated, empty, 16-bit, not an image) does not stop the
others: it is named on stderr and in errors.csv (file, error), and summary.json counts it
(`n_failed`). Every file is read once before any model work, so unreadable files are reported at
once and a folder with no readable image is an error before the model is loaded.

The output folder is complete or absent (`iepjax.atomic`): it is written under a hidden temporary
name and renamed when its last file is in, either the next <run>/inference/v<N> (`runs.new_output`,
which also moves <run>/inference/latest) or the folder `out` (`atomic.output_folder`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from iepjax import atomic, calibrated_maps, outputs, presets, report, runs, visualize
from iepjax.config import DataConfig, ProjectionConfig, ThresholdConfig
from iepjax.data.layout import IMAGE_EXTENSIONS, DataError, list_images, read_image
from iepjax.data.preprocess import Preprocess
from iepjax.localization import calibrate_maps, localize_images
from iepjax.pipelines.project import prepare_run
from iepjax.thresholds import map_fits

ERROR_COLUMNS = ("file", "error")


def output_name(rel: Path, suffix: str) -> Path:
    """The output path of the input file `rel` (relative to the input folder): its whole name with
    `suffix` appended, in the same sub-folders (line2/x.png -> line2/x.png.tiff). Keeping the
    extension makes the names unique: x.png and x.jpg get x.png.tiff and x.jpg.tiff."""
    return rel.parent / (rel.name + suffix)


class Inputs(NamedTuple):
    """The files of an input folder sorted into those that read as images and those that do not
    (relative path, the reader's message)."""

    readable: list[Path]
    failed: list[tuple[str, str]]


def check_inputs(input_dir: str | Path, channels: int | None = None, *, quiet: bool = False,
                 window: tuple[float, float] | None = None) -> Inputs:
    """Read every image file under `input_dir` once (`list_images`, `read_image`, high-depth files
    through `window`, the run's intensity window): which can be used.

    Each unreadable file is named on stderr (one line each) unless `quiet`. Raises FileNotFoundError for a
    missing folder and DataError when no file is readable (nothing to do), both before any model
    work.
    """
    input_dir = Path(input_dir)
    files = list_images(input_dir)
    if not files:
        raise DataError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) found under {input_dir}")
    readable, failed = [], []
    for p in files:
        try:
            read_image(p, channels, window)
            readable.append(p)
        except DataError as e:
            failed.append((p.relative_to(input_dir).as_posix(), str(e)))
            if not quiet:
                print(f"skipped: {e}", file=sys.stderr)
    if not readable:
        raise DataError(f"none of the {len(files)} image files under {input_dir} can be read "
                        f"(the first: {failed[0][1]}): check the files")
    return Inputs(readable, failed)


@contextlib.contextmanager
def _output_folder(run_dir: Path, out: Path | None, overwrite: bool):
    if out is None:
        with runs.new_output(run_dir / "inference") as folder:
            yield folder
    else:
        with atomic.output_folder(out, replace=overwrite) as folder:
            yield folder


def infer_folder(run_dir: str | Path, input_dir: str | Path, source: DataConfig, config: ProjectionConfig,
                 thresholds: ThresholdConfig = ThresholdConfig(), *, out: str | Path | None = None,
                 overwrite: bool = False, batch_size: int = 16, overlays: bool = True, progress: bool = True,
                 chunk: int = 64, mesh=None) -> tuple[Path, dict]:
    """Maps, overlays and image scores of every readable image under input_dir; returns (the output
    folder, summary.json's content).

    `out`: the output folder (default: the next <run>/inference/v<N>); an existing non-empty `out`
    is an error (FileExistsError, before any work) unless `overwrite`, which replaces it once the
    new one is complete. The run's thresholds and early stopping as in `pipelines.project.project_run`,
    from the held-out images of the folder the run was trained on; the images are preprocessed as
    the run's (`preprocess.json`, else the category preset's) and processed in chunks of `chunk`,
    so memory stays bounded. Unreadable files are listed (errors.csv, summary "failed"), not fatal.
    """
    run_dir, input_dir = Path(run_dir), Path(input_dir)
    out = Path(out) if out is not None else None
    if out is not None:
        runs.check_output_folder(out, overwrite=overwrite)
    stored = Preprocess.load(run_dir)
    inputs = check_inputs(input_dir, runs.model_config(run_dir).get("channels"),
                          window=stored.intensity_window if stored is not None else None)
    failed = list(inputs.failed)
    run = prepare_run(run_dir, dataclasses.replace(source, source_dir=None), config, thresholds,
                      batch_size=batch_size, progress=progress, mesh=mesh)
    model = run.config.model
    prep = run.prep or presets.preprocess(source.dataset, source.category, size=model.size)
    g = run.stats["grad"]
    fits = map_fits(run.stats) if thresholds.map.kind == "nce" else None
    rows = []
    with _output_folder(run_dir, out, overwrite) as folder:
        panels = visualize.PanelFigure(g.vmax)
        try:
            for c0 in range(0, len(inputs.readable), chunk):
                part, images = [], []
                for p in inputs.readable[c0:c0 + chunk]:
                    try:  # read again: a file may have changed since `check_inputs`
                        images.append(read_image(p, model.channels, prep.intensity_window))
                        part.append(p)
                    except DataError as e:
                        failed.append((p.relative_to(input_dir).as_posix(), str(e)))
                        print(f"skipped: {e}", file=sys.stderr)
                if not part:
                    continue
                res = localize_images(run.params, run.config, images, prep, batch_size=batch_size,
                                      progress=progress, mesh=mesh)
                res = calibrate_maps(res, images, fits, thresholds.map)
                for i, p in enumerate(part):
                    rel = p.relative_to(input_dir)
                    m = res.maps["grad"][i]
                    outputs.write_tiff(folder.path / "maps" / output_name(rel, ".tiff"), m)
                    score = calibrated_maps.image_score(m, thresholds.map, g.pixel_threshold)
                    rows.append([rel.as_posix(), f"{score:.6g}", int(score >= g.image_threshold),
                                 f"{float((m >= g.pixel_threshold).mean()):.6g}", f"{m.shape[1]}x{m.shape[0]}"])
                    if overlays:
                        panels.draw(folder.path / "overlays" / output_name(rel, ".png"),
                                    res.view_images[i].astype(np.float32) / 255.0, res.loc.x_T[i], res.loc.recon[i],
                                    res.loc.grad_maps[i], None, f"{rel.as_posix()}  score {score:.3f}",
                                    g.pixel_threshold)
        finally:
            panels.close()
        failed.sort()
        report.write_csv(folder.path / "scores.csv", report.INFER_COLUMNS, rows)
        report.write_csv(folder.path / "errors.csv", ERROR_COLUMNS, failed)
        user = thresholds.pixel_threshold is not None or thresholds.image_threshold is not None
        summary = {"run": str(run_dir), "input_dir": str(input_dir), "n_images": len(rows),
                   "map": thresholds.map.score_record(),
                   "n_flagged": sum(r[2] for r in rows), "n_failed": len(failed),
                   "failed": [f for f, _ in failed], "image_threshold": g.image_threshold,
                   "pixel_threshold": g.pixel_threshold,
                   "thresholds_from": "given" if user else run.source if thresholds.normal_dir else
                   f"{g.n_images} held-out normal training images",
                   "preprocess": prep.to_dict()}
        atomic.write_json(folder.path / "summary.json", summary)
    return folder.final, summary
