"""Contact sheet of test images and their masks, to eyeball the drawn defects.

    python -m iepjax.data.preview --out /tmp/textures_preview.png [--data-dir DIR]
        [--categories brick,weave] [--defect-kinds blur,smooth,lost_texture] [--per-kind 2]

Per category: row 1 the test images as stored, row 2 the same with the mask outline in
red, row 3 the masks.  One good image and `per_kind` of each defect kind per category.
Gray and RGB categories share a sheet (gray shown as RGB). The sheets under docs/img:

    --defect-kinds blur,smooth,lost_texture --per-kind 1 --out docs/img/textures_detail_loss.png
    --categories tissue,tissue_gray,weave --per-kind 1 --out docs/img/textures_new_categories.png
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


def contact_sheet(dataset: str = "textures", data_dir: str | None = None, per_kind: int = 2,
                  categories: tuple[str, ...] | None = None, **overrides) -> np.ndarray:
    """RGB uint8 sheet (rows, cols, 3): for each category, image / image+mask outline / mask rows.

    `categories`: default every category of `dataset`; `overrides`: builder-config fields
    (``seed``, ``defect_kinds``, ...).
    """
    bands = []
    for category in categories or CATEGORIES[dataset]:
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
    ap.add_argument("--categories", default=None, help="comma-separated (default: all)")
    ap.add_argument("--defect-kinds", default=None, help="comma-separated (default: the builder's)")
    ap.add_argument("--per-kind", type=int, default=2)
    args = ap.parse_args()
    overrides = {} if args.seed is None else {"seed": args.seed}
    if args.defect_kinds:
        overrides["defect_kinds"] = tuple(args.defect_kinds.split(","))
    categories = tuple(args.categories.split(",")) if args.categories else None
    import skimage.io

    sheet = contact_sheet(args.dataset, args.data_dir, args.per_kind, categories, **overrides)
    skimage.io.imsave(args.out, sheet, check_contrast=False)
    print(f"wrote {args.out} {sheet.shape}")


if __name__ == "__main__":
    main()
