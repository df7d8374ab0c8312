"""Contact sheet of test images and their masks, to eyeball the drawn defects.

    python -m iepjax.data.preview --out /tmp/textures_preview.png [--data-dir DIR]

Per category: row 1 the test images as stored, row 2 the same with the mask outline in
red, row 3 the masks.  One good image and two of each defect kind per category.
"""

from __future__ import annotations

import argparse

import numpy as np

from iepjax.data import CATEGORIES, load_split


def _outline(mask: np.ndarray) -> np.ndarray:
    """Inner boundary pixels of a bool mask."""
    p = np.pad(mask, 1)
    core = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~core


def contact_sheet(dataset: str = "textures", data_dir: str | None = None, per_kind: int = 2, **overrides) -> np.ndarray:
    """RGB uint8 sheet: for each category, image / image+mask outline / mask rows."""
    bands = []
    for category in CATEGORIES[dataset]:
        s = load_split(dataset, category, "test", data_dir, **overrides)
        picks = [s.defect_types.index("good")]
        for kind in sorted(set(s.defect_types) - {"good"}):
            picks += [i for i, t in enumerate(s.defect_types) if t == kind][:per_kind]
        rows = [[], [], []]
        for i in picks:
            img = np.repeat(s.images[i][..., :1], 3, axis=-1) if s.images.shape[-1] == 1 else s.images[i]
            over = img.copy()
            over[_outline(s.masks[i])] = (255, 0, 0)
            m = np.repeat((s.masks[i] * 255).astype(np.uint8)[..., None], 3, axis=-1)
            for r, tile in zip(rows, (img, over, m)):
                r.append(np.pad(tile, ((2, 2), (2, 2), (0, 0)), constant_values=128))
        bands.append(np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0))
    width = max(b.shape[1] for b in bands)
    bands = [np.pad(b, ((0, 8), (0, width - b.shape[1]), (0, 0)), constant_values=255) for b in bands]
    return np.concatenate(bands, axis=0)


def main() -> None:
    """CLI: write the contact sheet PNG."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="textures")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="/tmp/textures_preview.png")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    overrides = {} if args.seed is None else {"seed": args.seed}
    import skimage.io

    sheet = contact_sheet(args.dataset, args.data_dir, **overrides)
    skimage.io.imsave(args.out, sheet, check_contrast=False)
    print(f"wrote {args.out} {sheet.shape}")


if __name__ == "__main__":
    main()
