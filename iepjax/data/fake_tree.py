"""A small fake MVTec AD tree of real image files, for tests and for trying the commands.

``make_fake_mvtec(root)`` writes two categories (``grid``: single-channel
300x200 PNGs with odd sizes, ``widget``: RGB JPEG/BMP/PNG 180x150) with two defect kinds each:
one kind with masks, one (``nomask``) without a ``ground_truth`` folder; ``test/good`` has no
masks, as in MVTec AD. The textures are smooth noise with drawn blobs as defects.

    python -m iepjax.data.fake_tree /tmp/fake_mvtec
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def _texture(rng: np.random.Generator, h: int, w: int, c: int) -> np.ndarray:
    from scipy import ndimage
    base = ndimage.gaussian_filter(rng.normal(size=(h, w, c)), sigma=(3, 3, 0))
    base = (base - base.min()) / max(base.max() - base.min(), 1e-6)
    return np.clip(60 + 120 * base, 0, 255).astype(np.uint8)


def _blob(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4)
    r = max(4, min(h, w) // 10)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _save(path: Path, arr: np.ndarray) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    a = arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr
    Image.fromarray(a).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(a).save(path)


def _deep(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """A uint8 gray image as 12-bit data in a 16-bit container (scanners' and cameras' usual form)."""
    return (img.astype(np.uint16) * 16 + rng.integers(0, 16, size=img.shape, dtype=np.uint16))


def make_category(root: str | Path, name: str, *, channels: int, size_hw: tuple[int, int], n_train: int = 6,
                  n_good: int = 2, n_defect: int = 2, exts: tuple[str, ...] = (".png",), seed: int = 0,
                  kinds: tuple[str, ...] = ("blob", "nomask"), masked: tuple[str, ...] = ("blob",),
                  odd_size_hw: tuple[int, int] | None = None, bits: int = 8) -> Path:
    """Write one category; returns its folder. `odd_size_hw`: size of one test image that differs.
    `bits` 16 (gray PNG/TIFF only): the images hold 12-bit values in 16-bit files."""
    if bits not in (8, 16) or (bits == 16 and (channels != 1 or any(e not in (".png", ".tif") for e in exts))):
        raise ValueError("bits: 8, or 16 for gray .png / .tif images")
    rng = np.random.default_rng(seed)
    cat = Path(root) / name
    h, w = size_hw

    def save(path: Path, img: np.ndarray) -> None:
        _save(path, _deep(rng, img) if bits == 16 else img)

    for i in range(n_train):
        save(cat / "train" / "good" / f"{i:03d}{exts[i % len(exts)]}", _texture(rng, h, w, channels))
    for i in range(n_good):
        hh, ww = odd_size_hw if (odd_size_hw and i == 0) else (h, w)
        save(cat / "test" / "good" / f"{i:03d}{exts[i % len(exts)]}", _texture(rng, hh, ww, channels))
    for kind in kinds:
        for i in range(n_defect):
            hh, ww = odd_size_hw if (odd_size_hw and i == 1) else (h, w)
            img = _texture(rng, hh, ww, channels)
            m = _blob(rng, hh, ww)
            img[m] = 250 if i % 2 == 0 else 10
            ext = exts[i % len(exts)]
            save(cat / "test" / kind / f"{i:03d}{ext}", img)
            if kind in masked:
                _save(cat / "ground_truth" / kind / f"{i:03d}_mask.png", m.astype(np.uint8) * 255)
    return cat


def make_fake_mvtec(root: str | Path, *, gray_bits: int = 8, **kwargs) -> Path:
    """Two categories: ``grid`` (gray PNG, 300x200 (WxH), one test image 317x211; named after the
    MVTec AD texture, so the texture preset (crops, tiling) applies; `gray_bits` 16: 12-bit values in
    16-bit PNGs) and ``widget`` (RGB, 180x150, PNG/JPEG/BMP files, one test image 203x161; an
    object). Returns root."""
    root = Path(root)
    make_category(root, "grid", channels=1, size_hw=(200, 300), odd_size_hw=(211, 317), seed=1, bits=gray_bits,
                  **kwargs)
    make_category(root, "widget", channels=3, size_hw=(150, 180), odd_size_hw=(161, 203), seed=2,
                  exts=(".png", ".jpg", ".bmp"), **kwargs)
    return root


if __name__ == "__main__":
    print(make_fake_mvtec(sys.argv[1] if len(sys.argv) > 1 else "fake_mvtec"))
