"""Bring images to the model's input size: objects are resized, textures are cropped / tiled.

The paper's protocol (docs/method.md, Training; Bergmann et al. 2018):

* objects (bottle, cable, ...): the whole image is resized to size x size (128 by default) for
  training and for testing; the map is resized back to the image's original size.
* textures (carpet, grid, leather, tile, wood, and the built-in textures): the image is first
  brought to a *working resolution* whose short side is ``size / texture_fov`` (MVTec textures:
  fov 0.25, i.e. 1024 px -> 512 px for a 128 px model, as in Bergmann et al.). A trained run
  fixes that scale once, from its training images (``pixel_scale``, `Preprocess.with_pixel_scale`),
  and resizes every image by it, so an image of another size than the training images is seen
  at the scale the model learned (the same camera, the same texture in pixels); training samples
  random size x size crops of it (``patches_per_epoch`` distinct crops, ~10 000; flips and
  90-degree rotations are applied by the training step). At test time the whole working-resolution
  image is **tiled** into size x size tiles (stride ``tile_stride``, the last tile aligned to the
  border; ``AUTO_STRIDE``: half a tile where the training images then take at most ``MAX_TILES``
  tiles, else no overlap, `Preprocess.with_tile_stride`), each tile is projected, the tile maps are stitched (overlaps
  blended, each tile weighted by the distance from its border, `tile_weights`) and the stitched
  map is resized to the original size. Tiling, not resizing, because the model must see the
  texture at the scale it was trained on: resizing a 1024 px carpet to 128 px would show it 4x
  smaller than any training crop, and a VAE with a dense bottleneck takes only size x size inputs.

Images may differ in size: functions take a stacked (N, H, W, C) array or a list of (H, W, C).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

KINDS = ("texture", "object")
AUTO_STRIDE = -1  # tile_stride: chosen from the training images' size (`Preprocess.with_tile_stride`)
# Half-overlapping tiles while an image takes at most this many: the built-in textures' 9 per 128 px
# crop at 64 px, not the 49 of an MVTec AD texture's 512 px working image at 128 px, whose preset keeps
# 16 tiles without overlap for cost (docs/calibration.md, Input scale and The presets table).
MAX_TILES = 16


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How images become model inputs. See the module docstring."""

    kind: str = "object"
    size: int = 128
    texture_fov: float = 0.25
    patches_per_epoch: int = 10000
    tile_stride: int = 0  # 0: size (tiles do not overlap); AUTO_STRIDE: from the training images, unresolved = 0
    upsample: bool = True  # textures: the working resolution may exceed the image's own (False: never)
    pixel_scale: float = 0.0  # textures: working px per image px for every image (0: each image's own, below)
    # high-depth image files -> uint8 through this (lo, hi), the training images' (`data.layout.intensity_window`);
    # None: 8-bit data. Applied when files are read, before everything above.
    intensity_window: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}: choose one of {', '.join(KINDS)}")
        if not 0 < self.texture_fov <= 1:
            raise ValueError(f"texture_fov={self.texture_fov}: must be in (0, 1]")
        if (self.tile_stride < 0 and self.tile_stride != AUTO_STRIDE) or self.tile_stride > self.size:
            raise ValueError(f"tile_stride={self.tile_stride}: must be in [1, {self.size}] (the model size; 0 = size)")
        if self.tile_stride == self.size:  # one form for "no overlap", so equal settings compare equal
            object.__setattr__(self, "tile_stride", 0)
        if not (self.pixel_scale >= 0 and np.isfinite(self.pixel_scale)):
            raise ValueError(f"pixel_scale={self.pixel_scale}: must be > 0, or 0 for each image's own scale")
        if self.intensity_window is not None:
            lo, hi = (float(v) for v in self.intensity_window)  # a JSON list becomes a (hashable) tuple
            if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
                raise ValueError(f"intensity_window={self.intensity_window}: must be finite (lo, hi) with hi > lo")
            object.__setattr__(self, "intensity_window", (lo, hi))

    @property
    def stride(self) -> int:
        return self.tile_stride if self.tile_stride > 0 else self.size

    def working_shape(self, h: int, w: int) -> tuple[int, int]:
        """Textures: (H', W') of the working resolution of an (h, w) image; objects: (size, size).

        With `pixel_scale` (a run's, `with_pixel_scale`) every image is resized by that one factor,
        so a texture keeps the pixel scale the model was trained at whatever the image's size;
        without, each image's short side is brought to size / texture_fov."""
        if self.kind == "object":
            return self.size, self.size
        scale = self.pixel_scale or self._scale(min(h, w))
        return max(self.size, int(round(h * scale))), max(self.size, int(round(w * scale)))

    def _scale(self, short_side: float) -> float:
        scale = (self.size / self.texture_fov) / short_side
        return scale if self.upsample else min(scale, 1.0)  # own photos: never invent pixels

    def with_pixel_scale(self, shapes_hw: Sequence[tuple[int, int]]) -> "Preprocess":
        """Textures without a `pixel_scale`: the one that brings the median short side of the
        (training) image shapes to size / texture_fov (at most 1 without `upsample`), so that test
        images of any size are seen at the training scale. Unchanged otherwise, or for no images."""
        if self.kind != "texture" or self.pixel_scale or not len(shapes_hw):
            return self
        short = float(np.median([min(h, w) for h, w in shapes_hw]))
        return dataclasses.replace(self, pixel_scale=self._scale(short))

    def with_tile_stride(self, shapes_hw: Sequence[tuple[int, int]]) -> "Preprocess":
        """An `AUTO_STRIDE` resolved for (training) images of `shapes_hw` (after `with_pixel_scale`):
        half a tile when the working image of the median shape then takes at most `MAX_TILES` tiles,
        else none (objects, or no images: none). Any other stride is returned unchanged."""
        if self.tile_stride != AUTO_STRIDE:
            return self
        if self.kind != "texture" or not len(shapes_hw):
            return dataclasses.replace(self, tile_stride=0)
        h, w = (int(np.median([hw[k] for hw in shapes_hw])) for k in (0, 1))
        half = max(1, self.size // 2)
        fits = len(tile_positions(*self.working_shape(h, w), self.size, half)) <= MAX_TILES
        return dataclasses.replace(self, tile_stride=half if fits else 0)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["intensity_window"] is None:  # 8-bit data: the dict (and the keys made of it) as before the field
            del d["intensity_window"]
        else:
            d["intensity_window"] = list(d["intensity_window"])
        return d

    def save(self, run_dir: str | Path) -> None:
        from iepjax.runs import atomic_write_text
        atomic_write_text(Path(run_dir) / "preprocess.json", json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, run_dir: str | Path) -> "Preprocess | None":
        path = Path(run_dir) / "preprocess.json"
        return cls(**json.loads(path.read_text())) if path.exists() else None


# --------------------------------------------------------------------------- resizing


def resize_to(image_HxWxC: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """Resize one uint8 image (H, W, C) to shape_hw with anti-aliasing (bilinear); no-op if already there."""
    image = np.asarray(image_HxWxC)
    if image.shape[:2] == tuple(shape_hw):
        return image
    from skimage.transform import resize
    out = resize(image, tuple(shape_hw) + image.shape[2:], order=1, anti_aliasing=True, preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_map(map_HxW: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """Resize a float map (or (H, W, C) float image) to shape_hw, bilinear, float32 (upsampling: no smoothing)."""
    m = np.asarray(map_HxW, dtype=np.float32)
    if m.shape[:2] == tuple(shape_hw):
        return m
    from skimage.transform import resize
    down = shape_hw[0] < m.shape[0] or shape_hw[1] < m.shape[1]
    return resize(m, tuple(shape_hw) + m.shape[2:], order=1, anti_aliasing=down, preserve_range=True).astype(np.float32)


def resize_images(images_NxHxWxC: np.ndarray | Sequence[np.ndarray], size: int) -> np.ndarray:
    """Resize uint8 images (a stacked (N, H, W, C) array or a list of (H_i, W_i, C)) to (N, size, size, C)."""
    if isinstance(images_NxHxWxC, np.ndarray) and images_NxHxWxC.ndim == 4 \
            and images_NxHxWxC.shape[1:3] == (size, size):
        return images_NxHxWxC
    return np.stack([resize_to(im, (size, size)) for im in images_NxHxWxC])


def resize_masks(masks_NxHxW: np.ndarray | Sequence[np.ndarray], size: int) -> np.ndarray:
    """Resize bool masks ((N, H, W) or a list of (H_i, W_i)) to (N, size, size): anomalous if half its area is."""
    if isinstance(masks_NxHxW, np.ndarray) and masks_NxHxW.ndim == 3 and masks_NxHxW.shape[1:3] == (size, size):
        return masks_NxHxW.astype(bool)
    from skimage.transform import resize
    out = []
    for m in masks_NxHxW:
        m = np.asarray(m)
        out.append(m.astype(bool) if m.shape == (size, size) else
                   resize(m.astype(np.float32), (size, size), order=1, anti_aliasing=True) >= 0.5)
    return np.stack(out)


# --------------------------------------------------------------------------- textures: tiles and crops


def tile_positions(h: int, w: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of size x size tiles covering an (h, w) image (h, w >= size); the last row/column
    of tiles is aligned to the border."""
    def starts(n: int) -> list[int]:
        s = list(range(0, n - size + 1, stride))
        if s[-1] != n - size:
            s.append(n - size)
        return s
    return [(y, x) for y in starts(h) for x in starts(w)]


class ImageLayout(NamedTuple):
    """Where the model inputs of one image come from: inputs[start:start + len(positions)]."""

    orig_hw: tuple[int, int]
    work_hw: tuple[int, int]
    positions: list[tuple[int, int]]  # tile corners at working resolution; [(0, 0)] for objects
    start: int


def model_inputs(images: np.ndarray | Sequence[np.ndarray], prep: Preprocess) -> tuple[np.ndarray, list[ImageLayout]]:
    """uint8 model inputs (M, size, size, C) of a list of images, and each image's layout.

    objects: one resized input per image; textures: the tiles of the working-resolution image.
    """
    inputs: list[np.ndarray] = []
    layouts: list[ImageLayout] = []
    s = prep.size
    for im in images:
        im = np.asarray(im)
        h, w = im.shape[:2]
        work = prep.working_shape(h, w)
        wim = resize_to(im, work)
        pos = [(0, 0)] if prep.kind == "object" else tile_positions(work[0], work[1], s, prep.stride)
        layouts.append(ImageLayout((h, w), work, pos, len(inputs)))
        inputs.extend(wim[y:y + s, x:x + s] for y, x in pos)
    return np.stack(inputs), layouts


def tile_weights(size: int) -> np.ndarray:
    """(size, size) blending weights of one tile: a linear ramp from its border (0.5) to its centre.

    Where tiles overlap, a pixel is taken mostly from the tile in which it lies farthest from the
    border: the model sees less context at a tile's border (zero padding), so its maps are
    brighter there (on brick, the 99th percentile of good pixels 1.9x the interior's within a
    pixel of a tile border).
    """
    d = np.minimum(np.arange(size), size - 1 - np.arange(size)) + 0.5
    return np.outer(d, d)


def stitch(tiles: np.ndarray, layout: ImageLayout) -> np.ndarray:
    """The working-resolution array of one image from its tiles' outputs (M, size, size[, C]).

    Overlaps are blended with `tile_weights` (a pixel covered by one tile is that tile's value,
    exactly).
    """
    part = np.asarray(tiles[layout.start:layout.start + len(layout.positions)], dtype=np.float32)
    if len(layout.positions) == 1 and part.shape[1:3] == tuple(layout.work_hw):
        return part[0]
    s = part.shape[1]
    w = tile_weights(s).reshape((s, s) + (1,) * (part.ndim - 3))
    acc = np.zeros(tuple(layout.work_hw) + part.shape[3:], np.float64)  # float64: w * t / w == t exactly
    cnt = np.zeros(tuple(layout.work_hw) + (1,) * (part.ndim - 3), np.float64)
    for (y, x), t in zip(layout.positions, part):
        acc[y:y + s, x:x + s] += w * t
        cnt[y:y + s, x:x + s] += w
    return (acc / cnt).astype(np.float32)


class PatchBank:
    """`n` random size x size crops of working-resolution images, made on demand (array-like, uint8).

    Crop i is a deterministic function of (seed, i), so a resumed training run sees the same
    crops; `bank[idx]` with an int, a slice or an index array returns (len(idx), size, size, C).
    """

    lazy = True

    def __init__(self, images: Sequence[np.ndarray], size: int, n: int, seed: int = 0):
        self.images = [np.asarray(im) for im in images]
        if not self.images:
            raise ValueError("no images to crop patches from")
        for im in self.images:
            if im.shape[0] < size or im.shape[1] < size:
                raise ValueError(f"an image of {im.shape[1]}x{im.shape[0]} is smaller than the {size}px patches")
        self.size, self.n, self.seed = size, int(n), seed
        c = self.images[0].shape[2]
        self.shape = (self.n, size, size, c)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4

    def __len__(self) -> int:
        return self.n

    def _crop(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 11, int(i)])
        im = self.images[int(rng.integers(len(self.images)))]
        y = int(rng.integers(im.shape[0] - self.size + 1))
        x = int(rng.integers(im.shape[1] - self.size + 1))
        return im[y:y + self.size, x:x + self.size]

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, (int, np.integer)):
            return self._crop(idx % self.n)
        if isinstance(idx, slice):
            idx = range(*idx.indices(self.n))
        return np.stack([self._crop(i) for i in np.asarray(list(idx)).ravel()]) if len(idx) else \
            np.zeros((0,) + self.shape[1:], np.uint8)

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out.astype(dtype) if dtype is not None else out


def training_inputs(images: np.ndarray | Sequence[np.ndarray], prep: Preprocess, seed: int = 0):
    """Model inputs for training: objects: (N, size, size, C) resized; textures: a PatchBank of
    `patches_per_epoch` crops of the working-resolution images (or the images themselves when they
    already are size x size, as the built-in textures are)."""
    if prep.kind == "object":
        return resize_images(images, prep.size)
    work = [resize_to(im, prep.working_shape(*np.shape(im)[:2])) for im in images]
    if all(w.shape[:2] == (prep.size, prep.size) for w in work):
        return np.stack(work)
    return PatchBank(work, prep.size, prep.patches_per_epoch, seed)
