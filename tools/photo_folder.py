"""An own-folder category cut from one photograph, with drawn defects: a transfer check on new data.

    python tools/photo_folder.py --photo skimage:moon --out /tmp/photos --category moon
    python train.py --data-dir /tmp/photos --category moon --kind texture --size 64 --steps 5000 \
        --batch-size 16 --lr 5e-4
    python project.py --data-dir /tmp/photos --category moon

Writes OUT/CATEGORY/ in the MVTec AD layout (docs/datasets.md, Your own images) from one photo of
a surface: `--train` crops of `--crop` px from its left part (the first `--train-fraction` of the
columns, all rows) into train/good, and from the right part `--good` normal crops into test/good
and `--per-kind` crops of each defect kind into test/<kind>, with exact masks in ground_truth/.
The two parts never share a pixel, as in the built-in data (docs/datasets.md). The defects are the
built-in ones (`iepjax.data.defects`: the structure kinds scratch, spot, stain, foreign, and the
detail-loss kinds blur, smooth, lost_texture), drawn as the textures builder draws them.
Everything is a deterministic function of `--seed`.

`--photo` is an image file (8-bit gray or RGB) or `skimage:NAME` for a photo that ships with
scikit-image; `--area R0 R1 C0 C1` keeps only rows R0..R1-1 and columns C0..C1-1 of it (a part of
the photo that is all surface, without borders or a background). It is how to check iepjax on a
surface no default was chosen on, through the path a user's own images take (docs/results.md,
"Own folders cut from photos no choice was made on").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from iepjax.data import defects

KIND_SETS = {"structure": defects.STRUCTURE_KINDS, "detail": defects.DETAIL_LOSS_KINDS}


def read_photo(photo: str) -> np.ndarray:
    """The photo as uint8 (H, W) or (H, W, 3): a file path, or skimage:NAME."""
    if photo.startswith("skimage:"):
        import skimage.data
        name = photo.split(":", 1)[1]
        if not hasattr(skimage.data, name):
            raise ValueError(f"scikit-image ships no photo {name!r}")
        img = np.asarray(getattr(skimage.data, name)())
    else:
        from iepjax.data.layout import read_image
        img = read_image(photo)
    if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise ValueError(f"{photo}: expected an 8-bit gray or RGB image, got {img.dtype} {img.shape}")
    if img.ndim == 3:
        img = img[:, :, 0] if img.shape[2] == 1 else img[:, :, :3]
    return img


def write_folder(
    photo: np.ndarray, out: Path, category: str, *, kinds=KIND_SETS["structure"] + ("blur",),
    crop: int = 128, train: int = 200, good: int = 16, per_kind: int = 6,
    train_fraction: float = 0.625, seed: int = 0,
) -> Path:
    """Write OUT/CATEGORY/ (see the module docstring) from `photo` (uint8 (H, W) or (H, W, 3))."""
    from PIL import Image

    h, w = photo.shape[:2]
    cut = int(round(w * train_fraction))
    if h < crop or cut < crop or w - cut < crop:
        raise ValueError(f"a {h}x{w} photo split at column {cut} cannot hold {crop} px crops on "
                         f"both sides; choose a smaller --crop or another --train-fraction")
    rng = np.random.default_rng(seed)
    root = Path(out) / category
    folders = ["train/good", "test/good"] + [f"{d}/{k}" for k in kinds for d in ("test", "ground_truth")]
    for sub in folders:
        (root / sub).mkdir(parents=True, exist_ok=True)

    hwc = photo if photo.ndim == 3 else photo[:, :, None]

    def take(c0: int, c1: int) -> np.ndarray:
        y, x = rng.integers(0, h - crop + 1), rng.integers(c0, c1 - crop + 1)
        return hwc[y:y + crop, x:x + crop]

    def save(image_HxWxC: np.ndarray, name: str) -> None:
        Image.fromarray(image_HxWxC[:, :, 0] if image_HxWxC.shape[2] == 1 else image_HxWxC).save(root / name)

    for i in range(train):
        save(take(0, cut), f"train/good/{i:03d}.png")
    for i in range(good):
        save(take(cut, w), f"test/good/{i:03d}.png")
    for kind in kinds:
        for i in range(per_kind):
            image, mask = defects.draw_visible(kind, take(cut, w), rng)
            save(image, f"test/{kind}/{i:03d}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / f"ground_truth/{kind}/{i:03d}_mask.png")
    return root


def main(argv=None) -> int:
    from iepjax.cli import positive_int

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photo", required=True, help="an image file, or skimage:NAME")
    p.add_argument("--out", required=True, help="the data folder to write (train.py --data-dir)")
    p.add_argument("--category", required=True, help="the category folder's name")
    p.add_argument("--kinds", nargs="+", default=list(KIND_SETS["structure"]) + ["blur"],
                   help=f"defect kinds, or 'structure' / 'detail' (valid kinds: {', '.join(defects.DEFECT_KINDS)})")
    p.add_argument("--area", type=int, nargs=4, metavar=("R0", "R1", "C0", "C1"),
                   help="use only rows R0..R1-1 and columns C0..C1-1 of the photo")
    p.add_argument("--crop", type=positive_int, default=128, help="crops' side in px")
    p.add_argument("--train", type=positive_int, default=200, help="training crops")
    p.add_argument("--good", type=positive_int, default=16, help="normal test crops")
    p.add_argument("--per-kind", type=positive_int, default=6, help="test crops per defect kind")
    p.add_argument("--train-fraction", type=float, default=0.625, help="the columns the training crops come from")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    kinds = [k for name in args.kinds for k in KIND_SETS.get(name, (name,))]
    unknown = [k for k in kinds if k not in defects.DEFECT_KINDS]
    if unknown:
        p.error(f"unknown defect kind(s) {', '.join(unknown)}; valid: {', '.join(defects.DEFECT_KINDS)}")
    if not 0.0 < args.train_fraction < 1.0:
        p.error("--train-fraction must be between 0 and 1")
    try:
        photo = read_photo(args.photo)
        if args.area:
            r0, r1, c0, c1 = args.area
            if not (0 <= r0 < r1 <= photo.shape[0] and 0 <= c0 < c1 <= photo.shape[1]):
                h, w = photo.shape[:2]
                raise ValueError(f"--area {r0} {r1} {c0} {c1} is not inside the {h}x{w} photo")
            photo = photo[r0:r1, c0:c1]
        root = write_folder(photo, Path(args.out), args.category, kinds=tuple(dict.fromkeys(kinds)),
                            crop=args.crop, train=args.train, good=args.good, per_kind=args.per_kind,
                            train_fraction=args.train_fraction, seed=args.seed)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
