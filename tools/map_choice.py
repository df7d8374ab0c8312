"""Which map suits a run, judged on its normal images only: paper or nce (docs/calibration.md).

    python tools/map_choice.py --run results/vae/textures/brick/latest --category brick
    python tools/map_choice.py --run results/vae/folder/NAME/latest --dataset folder --category NAME --data-dir DIR

No test image and no label enters. The run's held-out normal training images are split in two:
the even ones fit the nce map's tables (as project.py fits them on all of them), the odd ones get
one CutPaste defect each (Li et al. 2021: a rectangle of 12 to 24 px, or a thin one, cut from
the image itself, flipped, and pasted elsewhere in it; `cutpaste`) and are projected with their
clean copies. Prints one JSON line: the pixel AUROC of the paper map (`--map paper`) and of the
nce map (`--map nce`) on them, for the recon and grad rows, and the map with the higher grad row.

CutPaste defects are not the defects of any test split: they are a proxy made of normal texture,
the run's own guess at which map separates irregularities of its texture better. How its
suggestion compared with the built-in test splits: docs/calibration.md, "A map chosen on normal
images". project.py does not use it; `--map` chooses.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

PATCH_PX = (12, 24)  # the side of a pasted rectangle (as the built-in foreign patches)


def cutpaste(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image with one rectangle of itself pasted elsewhere, bool mask (H, W) of the pixels it changed).

    `image` (H, W[, C]) uint8. The rectangle is square or thin (a "scar", a quarter to the full side),
    flipped at random, and pasted at least half its size away from where it was cut."""
    h, w = image.shape[:2]
    side = int(rng.integers(PATCH_PX[0], PATCH_PX[1] + 1))
    other = int(rng.integers(max(4, side // 4), side + 1)) if rng.random() < 0.5 else side
    ph, pw = (side, other) if rng.random() < 0.5 else (other, side)
    y0, x0 = int(rng.integers(2, h - ph - 2)), int(rng.integers(2, w - pw - 2))
    patch = image[y0:y0 + ph, x0:x0 + pw]
    patch = patch[::-1] if rng.random() < 0.5 else patch
    patch = patch[:, ::-1] if rng.random() < 0.5 else patch
    for _ in range(100):  # somewhere else (an image of about the patch's size may leave no choice)
        y1, x1 = int(rng.integers(2, h - ph - 2)), int(rng.integers(2, w - pw - 2))
        if abs(y1 - y0) > ph // 2 or abs(x1 - x0) > pw // 2:
            break
    out = image.copy()
    out[y1:y1 + ph, x1:x1 + pw] = patch
    changed = out != image
    return out, changed.any(-1) if changed.ndim == 3 else changed


def _refusal(run_dir: Path) -> str | None:
    """Why `run_dir` cannot be measured, or None."""
    from iepjax.thresholds import held_out_ids

    if not (run_dir / "config.json").exists():
        return f"{run_dir} is not a run folder (no config.json)"
    if len(held_out_ids(run_dir)) < 4:
        return f"{run_dir} holds out fewer than 4 normal images: too few to fit on half and test on half"
    return None


def measure(run_dir: Path, dataset: str, category: str, tfds_dir: str | None = None, data_dir: str | None = None,
            seed: int = 0, steps: int | None = None) -> dict:
    """The JSON line of the module docstring for one run; `steps`: the projection's (default: the preset's)."""
    from sklearn.metrics import roc_auc_score

    from iepjax import calibrated_maps, thresholds
    from iepjax.config import DataConfig, default_map
    from iepjax.localization import localize_images
    from iepjax.pipelines.project import prepare_run, run_preset

    source = DataConfig(dataset, category, tfds_dir, data_dir)
    config = run_preset(run_dir, source)  # as project.py
    config = config if steps is None else dataclasses.replace(config, steps=steps)
    run = prepare_run(run_dir, source, config, progress=False)  # resolved alpha, lam, stop_loss
    held = thresholds.held_out_images(run_dir, dataset, category, tfds_dir, source_dir=data_dir)
    fit_on, defect_on = list(held[0::2]), list(held[1::2])
    rng = np.random.default_rng(seed)
    pairs = [cutpaste(np.asarray(im), rng) for im in defect_on]
    images = [d for d, _ in pairs] + defect_on
    masks = [m for _, m in pairs] + [np.zeros(np.shape(im)[:2], bool) for im in defect_on]
    nce = default_map("nce")
    raw_config = dataclasses.replace(run.config, smoothing_sigma=0.0)  # the nce map's input, as project.py's
    fitted = localize_images(run.params, raw_config, fit_on, run.prep, progress=False).maps
    raw = localize_images(run.params, raw_config, images, run.prep, progress=False).maps
    paper = localize_images(run.params, run.config, images, run.prep, progress=False).maps
    y = np.concatenate([m.ravel() for m in masks])
    out = {"run": str(run_dir), "held_out": len(held), "fit_on": len(fit_on), "cutpaste": len(pairs)}
    for row in ("recon", "grad"):
        fit = calibrated_maps.fit_normal(fitted[row], fit_on, nce)
        maps = {"paper": paper[row], "nce": calibrated_maps.nce_maps(fit, raw[row], images, nce)}
        for kind, ms in maps.items():
            out[f"{row} {kind}"] = round(float(roc_auc_score(y, np.concatenate([np.ravel(m) for m in ms]))), 4)
    out["suggests"] = "nce" if out["grad nce"] > out["grad paper"] else "paper"
    return out


def main(argv=None) -> int:
    from iepjax import cli

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run folder (results/<model>/<dataset>/<category>/v<N> or latest)")
    p.add_argument("--category", required=True)
    p.add_argument("--dataset", default="textures")
    p.add_argument("--data-dir", default=None, help="the image folder of an own-folder run (default: the run's own)")
    p.add_argument("--tfds-dir", default=None)
    p.add_argument("--seed", type=int, default=0, help="the seed of the CutPaste defects")
    p.add_argument("--steps", type=cli.nonnegative_int, default=None,
                   help="projection steps (default: the preset's, as project.py)")
    a = p.parse_args(argv)
    run_dir = Path(a.run).resolve()
    refusal = _refusal(run_dir)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    print(json.dumps(measure(run_dir, a.dataset, a.category, a.tfds_dir, a.data_dir, a.seed, a.steps)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
