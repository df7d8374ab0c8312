"""An own-folder category of a high-entropy random texture, to check training on data that collapses.

    python tools/rough_folder.py --out /tmp/rough --sigma 1.5
    python train.py --data-dir /tmp/rough --category noise --kind texture --size 64 --steps 5000 \
        --batch-size 16 --lr 5e-4

Writes OUT/noise/ in the MVTec AD layout (docs/datasets.md, Your own images): uniform noise of
1024x1024 px blurred by a Gaussian of `--sigma` px and stretched to 0..255; 120 training crops of
128 px (`--train-size`) from its top three quarters, and from the bottom quarter 8 good test crops
and 8 with a saturated disc of radius 8 px (kind "spot", with masks), 128 px too (`--test-size`).
The smaller the sigma, the less of the texture a model can reproduce (docs/calibration.md,
Collapse). Test crops of another size than the training crops check that a run sees every image at
its training scale (docs/datasets.md, Preprocessing).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def write_folder(out: Path, sigma: float, seed: int = 0, train_size: int = 128, test_size: int = 128) -> Path:
    """Write OUT/noise/ (see the module docstring); returns the category folder."""
    from PIL import Image
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    big = ndimage.gaussian_filter(rng.random((1024, 1024)), sigma)
    big = np.round((big - big.min()) / (big.max() - big.min()) * 255).astype(np.uint8)
    root = Path(out) / "noise"
    for sub in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    a, t = train_size, test_size
    for i in range(120):
        y, x = rng.integers(0, 768 - a), rng.integers(0, 1024 - a)
        Image.fromarray(big[y:y + a, x:x + a]).save(root / f"train/good/{i:03d}.png")
    for i in range(8):
        y, x = rng.integers(768, 1024 - t), rng.integers(0, 1024 - t)
        Image.fromarray(big[y:y + t, x:x + t]).save(root / f"test/good/{i:03d}.png")
    yy, xx = np.mgrid[:t, :t]
    for i in range(8):
        y, x = rng.integers(768, 1024 - t), rng.integers(0, 1024 - t)
        crop = big[y:y + t, x:x + t].copy()
        cy, cx = rng.integers(30, t - 30, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 8 ** 2
        crop[disc] = 255
        Image.fromarray(crop).save(root / f"test/spot/{i:03d}.png")
        Image.fromarray((disc * 255).astype(np.uint8)).save(root / f"ground_truth/spot/{i:03d}_mask.png")
    return root


def main(argv=None) -> int:
    from iepjax.cli import positive_float
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the data folder to write (train.py --data-dir)")
    p.add_argument("--sigma", type=positive_float, default=1.5, help="blur of the noise in px")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, choices=(128, 192, 256), default=128, help="training crops' side in px")
    p.add_argument("--test-size", type=int, choices=(128, 192, 256), default=128, help="test crops' side in px")
    a = p.parse_args(argv)
    print(f"category folder: {write_folder(Path(a.out), a.sigma, a.seed, a.train_size, a.test_size)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
