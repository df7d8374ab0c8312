"""The files of a projection folder (<run>/projections/v<N>/) and of a plain-folder inference.

Machine-readable: metrics.json, thresholds.json (the thresholds used), projection_config.json,
timing.json, maps.npz (raw float maps, ids, energies) and float32 TIFF anomaly maps at each test
image's original size in the official MVTec AD evaluator's layout
(anomaly_maps/<row>/<category>/test/<defect>/<id>.tiff). Pictures: energy.png, roc.png and,
unless the overlays are off, trajectory.png and one panel per image under overlays/. The
human-readable tables (scores.csv, index.html) are `iepjax.report`'s.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from iepjax import visualize
from iepjax.atomic import dumps_json
from iepjax.config import ProjectionConfig, to_dict
from iepjax.runs import atomic_write_bytes, atomic_write_text
from iepjax.scoring import ROWS


def write_results(out_dir: Path, result: dict, loc, ids: list[str], config: ProjectionConfig, stats: dict,
                  source: str) -> None:
    """metrics.json (`result`), projection_config.json, timing.json, maps.npz and thresholds.json
    (the thresholds used, {"grad", "recon"} -> `thresholds.NormalStats`, kept with the projection:
    the run's own thresholds.json holds one projection config's and is refitted for another)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "projection_config.json", dumps_json(to_dict(config)))  # strict JSON throughout
    atomic_write_text(out_dir / "timing.json", dumps_json(
        {"images": len(loc.grad_maps), "steps": config.steps, "compile_s": loc.compile_s, "total_s": loc.run_s}))
    buf = io.BytesIO()
    np.savez_compressed(buf, grad=loc.grad_maps, recon=loc.recon_maps, ids=np.asarray(ids), energies=loc.energies)
    atomic_write_bytes(out_dir / "maps.npz", buf.getvalue())
    atomic_write_text(out_dir / "metrics.json", dumps_json(result))  # strict JSON: NaN -> null
    atomic_write_text(out_dir / "thresholds.json", dumps_json(
        {"source": source, "projection": to_dict(config), "map": result.get("map", {"kind": "paper", "image_score": "max"}),
         **{row: stats[row]._asdict() for row in ("grad", "recon")}}))


def write_pictures(out_dir: Path, test, loc, grad_stats, frames: np.ndarray | None, strip: list[int],
                   overlays: bool = True) -> None:
    """energy.png, roc.png, trajectory.png (the `frames` of the images `strip`; none when `frames`
    is None) and, with `overlays`, a panel per image scaled by the normal images' bound
    `grad_stats.vmax`."""
    out_dir = Path(out_dir)
    visualize.energy_curve(out_dir / "energy.png", loc.energies, test.labels)
    visualize.roc_curves(out_dir / "roc.png", {"grad": loc.grad_maps, "recon": loc.recon_maps}, test.masks)
    if frames is not None:
        visualize.trajectory_strip(out_dir / "trajectory.png", frames, [test.ids[i] for i in strip])
    if overlays:
        visualize.write_overlays(out_dir / "overlays", test.images, loc, test.masks, test.ids, test.defect_types,
                                 grad_stats.vmax, grad_stats.pixel_threshold)


def tiff_path(root: str | Path, category: str, id_: str) -> Path:
    """<root>/<category>/test/<defect>/<stem>.tiff for an id "<defect>/<stem>"."""
    defect, _, stem = id_.partition("/")
    return Path(root) / category / "test" / defect / f"{stem}.tiff"


def write_tiff(path: Path, map_HxW: np.ndarray) -> Path:
    """One float32 TIFF anomaly map (folders created)."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.asarray(map_HxW, dtype=np.float32))
    return path


def write_tiffs(root: str | Path, category: str, ids: list[str], maps: Sequence[np.ndarray]) -> list[Path]:
    """Float32 TIFF anomaly maps in the official evaluator's layout; returns the paths."""
    return [write_tiff(tiff_path(root, category, id_), m) for id_, m in zip(ids, maps)]


def write_maps(out_dir: Path, category: str, ids: list[str], maps: dict) -> dict:
    """Write anomaly_maps/<row>/<category>/test/<defect>/<id>.tiff for both rows; returns {row: root}."""
    roots = {}
    for row in ROWS:
        root = Path(out_dir) / "anomaly_maps" / row
        write_tiffs(root, category, ids, maps[row])
        roots[row] = str(root)
    return roots
