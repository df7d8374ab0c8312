"""TFDS builder ``textures``: crops of real texture photos with drawn, subtle defects.

Categories (one config each; :data:`PHOTO_SHAPES` gives each photo's size and channels):

* ``brick``, ``grass``: ``skimage.data.brick()`` / ``grass()``, 512x512 gray photographs.
* ``tissue``: ``skimage.data.immunohistochemistry()`` (``ihc.png``), 512x512 RGB: stained
  tissue, glands (brown membranes, blue nuclei) and stroma; a colour, high-frequency texture.
* ``tissue_gray``: the same photograph as luma (ITU-R BT.601 weights, integer arithmetic),
  1 channel: another high-frequency gray texture (skimage ships none besides brick, grass and
  gravel, and gravel is kept out for independent evaluation); beside ``tissue`` it also isolates
  what colour changes for the method, the texture being the same.
* ``weave``: a plain-weave fabric, 512x512 gray, made by :func:`weave` from the grass photo: a
  regular pattern with natural irregularity (see there why not a tiled crop).

Records follow the MVTec AD layout used by this project: ``image`` (uint8 HxWxC, C = the
photo's channels: 1 for gray, 3 for RGB), ``mask`` (uint8 HxW, 0/255), ``label``
(good/defect), ``defect_type`` and ``id`` (``"<defect_type>/<NNN>"``).

* ``train``: ``num_train`` good crops inside ``train_region`` (default: all rows, the left
  5/8 of the columns: 0..319 of a 512 px wide photo).
* ``test``: ``num_test`` crops inside ``test_region`` (default: all rows, the other columns:
  320..511), so train and test never share a pixel; ``defect_fraction`` of them get one defect
  each, kinds balanced over ``defect_kinds`` (default :data:`DEFAULT_DEFECT_KINDS`, the four
  kinds that add structure; the detail-loss kinds of :mod:`iepjax.data.defects` on request).

The regions are side by side (columns), not one above the other: the brick photo is taken at
an angle, its bricks grow from the top to the bottom of the photo, so a split by rows gave test
crops of another scale than every training crop (and heat maps of good test crops that light up
on the mortar joints). Split by columns, both regions hold every scale; the bricks lean one way
on the left and the other on the right, which the training's horizontal flips cover. The tissue
photo has glands and stroma on both sides of column 320; the weave is the same everywhere.

Everything is a deterministic function of the config (``seed`` included):
:func:`plan_split` gives the crop origins/kinds/ids, :func:`clean_crop` the crop before any
defect, :func:`render` the final record.  The builder only writes what these return.

Storage is array_record; read it with ``builder.as_data_source(split)`` (no TensorFlow).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from iepjax.data import defects as defects_lib

PHOTOS = ("brick", "grass", "tissue", "tissue_gray", "weave")  # order fixes each photo's rng code
# (rows, cols, channels) of each photo, known without loading it (tests check them).
PHOTO_SHAPES: dict[str, tuple[int, int, int]] = {
    "brick": (512, 512, 1),
    "grass": (512, 512, 1),
    "tissue": (512, 512, 3),
    "tissue_gray": (512, 512, 1),
    "weave": (512, 512, 1),
}
TRAIN_FRACTION = 0.625  # default train region: this fraction of the columns, from the left
SPLITS = ("train", "test")
_SPLIT_CODE = {"train": 0, "test": 1}
_PHOTO_CODE = {name: i for i, name in enumerate(PHOTOS)}
# The defect kinds drawn on test crops unless a config says otherwise. Switching the default to
# every kind (defects_lib.DEFECT_KINDS, the detail-loss kinds included) changes the records of
# every category: bump Textures.VERSION with a release note and the record digests of the tests.
DEFAULT_DEFECT_KINDS: tuple[str, ...] = defects_lib.STRUCTURE_KINDS
_DEFAULTS = dict(
    seed=0,
    num_train=400,
    num_test=48,
    crop_size=128,
    train_region=(0, 512, 0, 320),  # of a 512x512 photo; see default_regions
    test_region=(0, 512, 320, 512),
    defect_fraction=0.5,
    defect_kinds=DEFAULT_DEFECT_KINDS,
)


def default_regions(photo: str) -> dict[str, tuple[int, int, int, int]]:
    """Default train_region / test_region of `photo`: all rows, columns split at TRAIN_FRACTION."""
    h, w, _ = PHOTO_SHAPES[photo]
    split = int(round(w * TRAIN_FRACTION))
    return {"train_region": (0, h, 0, split), "test_region": (0, h, split, w)}


def _defaults(photo: str) -> dict:
    """The default config fields of `photo`."""
    return {**_DEFAULTS, **default_regions(photo)}


@dataclasses.dataclass(eq=False, kw_only=True)
class TexturesConfig(tfds.core.BuilderConfig):
    """Which photo, the seed, split sizes, the region of the photo of each split, the defect kinds.

    A region is (row_start, row_stop, col_start, col_stop), half-open: the split's crops lie
    inside it. The two regions must not overlap. `defect_kinds`: the kinds drawn on the
    ``defect_fraction`` of test crops, in turn (names of :data:`iepjax.data.defects.DEFECTS`).
    """

    photo: str = "brick"
    seed: int = 0
    num_train: int = 400
    num_test: int = 48
    crop_size: int = 128
    train_region: tuple[int, int, int, int] = (0, 512, 0, 320)
    test_region: tuple[int, int, int, int] = (0, 512, 320, 512)
    defect_fraction: float = 0.5
    defect_kinds: tuple[str, ...] = DEFAULT_DEFECT_KINDS

    def region(self, split: str) -> tuple[int, int, int, int]:
        """(row_start, row_stop, col_start, col_stop), half-open, that `split` crops lie inside."""
        return {"train": self.train_region, "test": self.test_region}[split]

    def num(self, split: str) -> int:
        """Number of records of `split`."""
        return {"train": self.num_train, "test": self.num_test}[split]


def make_config(photo: str, **overrides) -> TexturesConfig:
    """Config for `photo`; non-default settings get a distinct name (so caches never collide)."""
    if photo not in PHOTOS:
        raise ValueError(f"unknown textures category {photo!r}; valid: {', '.join(PHOTOS)}")
    unknown = set(overrides) - set(_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown textures config fields {sorted(unknown)}; valid: {sorted(_DEFAULTS)}")
    defaults = _defaults(photo)
    params = {**defaults, **overrides}
    params["train_region"] = tuple(int(v) for v in params["train_region"])
    params["test_region"] = tuple(int(v) for v in params["test_region"])
    params["defect_kinds"] = _check_kinds(params["defect_kinds"])
    changed = {k: v for k, v in params.items() if v != defaults[k]}
    if not changed:
        name = photo
    else:
        parts = []
        for k, v in sorted(changed.items()):
            v = "-".join(map(str, v)) if isinstance(v, tuple) else str(v).replace(".", "p")
            parts.append(f"{k}{v}")
        name = f"{photo}_" + "_".join(parts)
    return TexturesConfig(
        name=name,
        description=f"{_SOURCES[photo][0]} crops, {params}",
        photo=photo,
        **params,
    )


def _check_kinds(kinds) -> tuple[str, ...]:
    """`kinds` as a tuple of str; ValueError if empty, repeated or not a known defect kind."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(str(k) for k in kinds)
    unknown = [k for k in kinds if k not in defects_lib.DEFECT_KINDS]
    if not kinds or unknown or len(set(kinds)) != len(kinds):
        raise ValueError(f"defect_kinds {kinds!r}: give distinct kinds among {', '.join(defects_lib.DEFECT_KINDS)}")
    return kinds


class CropSpec(NamedTuple):
    """One record of a split: where its crop comes from and what is drawn on it."""

    index: int  # position in the plan (also seeds the record's defect rng)
    id: str  # "<defect_type>/<NNN>"
    defect_type: str  # "good" or a defect kind
    row: int  # top-left corner of the crop in the photo
    col: int


# Woven fabric (:func:`weave`): thread pitch, thread width (fraction of the pitch), grain.
WEAVE_PITCH_PX = 16
WEAVE_THREAD_WIDTH = 0.84
WEAVE_GRAIN = 0.12  # relative brightness variation from the photo's grain
WEAVE_GRAIN_SIGMA_PX = 3.0  # the grain is smoothed along each thread: fibres
WEAVE_WOBBLE_PX = 1.0  # std of the smooth displacement of the threads
WEAVE_TINT = 0.05  # std of the relative brightness of single threads
WEAVE_SEED = 0  # fixed: the weave is one image, like the photographs


def weave(size: int = 512, supersample: int = 4) -> np.ndarray:
    """A plain-weave fabric made from the grass photo: uint8 (size, size), gray.

    Why not a tiled crop: a crop tiled (with mirroring) into a periodic texture gives test crops
    that are exact copies of training crops, so the split would test memory, not a model of the
    pattern. Real regular surfaces (fabric, mesh, grids) repeat a geometry with small
    irregularities. Here the geometry is exact but for a smooth displacement of the threads
    (~1 px) and a brightness per thread (+-5 %), both from a fixed seed; the grain that tells
    one thread from another comes from a photograph: the grass photo, normalised and smoothed
    along each thread (3 px: fibres), 12 % of the brightness. The grain of a weave pixel comes
    from the grass pixel at the same place (and its neighbours along the thread), so the weave's
    train and test regions take their detail from different parts of the photo.

    Geometry: warp threads run down, weft threads across, pitch 16 px, width 0.84 of the pitch;
    at each crossing one thread is on top, alternating (plain weave); a thread's height follows
    a cosine between crossings, and its brightness its cylindrical cross-section and its height;
    the gaps between threads are dark. Drawn with `supersample`^2 samples per pixel.
    """
    import skimage.data
    from scipy import ndimage

    rng = np.random.default_rng(WEAVE_SEED)
    p, ss = float(WEAVE_PITCH_PX), supersample

    def wobble() -> np.ndarray:
        f = ndimage.gaussian_filter(rng.standard_normal((size, size)), 20.0, mode="wrap")
        return f * (WEAVE_WOBBLE_PX / f.std())

    dx, dy = wobble(), wobble()
    n_threads = int(np.ceil(size / p)) + 4
    tint_warp = 1.0 + WEAVE_TINT * rng.standard_normal(n_threads)
    tint_weft = 1.0 + WEAVE_TINT * rng.standard_normal(n_threads)
    half = WEAVE_THREAD_WIDTH / 2
    offsets = (np.arange(ss) + 0.5) / ss - 0.5  # sub-pixel sample positions
    shade = np.empty((size, size))
    warp_cover = np.empty((size, size))
    weft_cover = np.empty((size, size))
    for r0 in range(0, size, 64):  # bands of rows: bounded memory
        rows = np.arange(r0, min(r0 + 64, size))
        yy = (rows[:, None, None, None] + offsets[None, :, None, None]) + dy[rows][:, None, :, None]
        xx = (np.arange(size)[None, None, :, None] + offsets[None, None, None, :]) + dx[rows][:, None, :, None]
        i, j = np.floor(xx / p), np.floor(yy / p)
        u, v = xx / p - i - 0.5, yy / p - j - 0.5  # across the warp / weft thread, in pitches
        top = np.where((i + j) % 2 == 0, 1.0, -1.0)  # +1: the warp is on top at this crossing
        prof_u = np.sqrt(np.clip(1.0 - (u / half) ** 2, 0.0, 1.0))  # cylinder cross-sections
        prof_v = np.sqrt(np.clip(1.0 - (v / half) ** 2, 0.0, 1.0))
        z_warp = top * np.cos(np.pi * v) + 0.3 * prof_u
        z_weft = -top * np.cos(np.pi * u) + 0.3 * prof_v
        in_warp, in_weft = np.abs(u) < half, np.abs(v) < half
        warp = in_warp & (~in_weft | (z_warp >= z_weft))
        weft = in_weft & ~warp
        ii = np.clip(i.astype(int) + 2, 0, n_threads - 1)
        jj = np.clip(j.astype(int) + 2, 0, n_threads - 1)
        b_warp = 0.60 * tint_warp[ii] * (0.45 + 0.55 * prof_u) * (0.75 + 0.125 * (z_warp + 1))
        b_weft = 0.50 * tint_weft[jj] * (0.45 + 0.55 * prof_v) * (0.75 + 0.125 * (z_weft + 1))
        sample = np.where(warp, b_warp, np.where(weft, b_weft, 0.12))
        shade[rows] = sample.mean((1, 3))
        warp_cover[rows] = warp.mean((1, 3))
        weft_cover[rows] = weft.mean((1, 3))
    g = skimage.data.grass().astype(np.float64)[:size, :size]
    g = (g - g.mean()) / g.std()
    grain_warp = ndimage.gaussian_filter1d(g, WEAVE_GRAIN_SIGMA_PX, axis=0)  # along the warp (down)
    grain_weft = ndimage.gaussian_filter1d(g, WEAVE_GRAIN_SIGMA_PX, axis=1)  # along the weft (across)
    grain = warp_cover * grain_warp / grain_warp.std() + weft_cover * grain_weft / grain_weft.std()
    out = shade * (1.0 + WEAVE_GRAIN * grain)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W) luma of uint8 (H, W, 3): ITU-R BT.601 weights, exact integer arithmetic."""
    r, g, b = (rgb[..., k].astype(np.int32) for k in range(3))
    return ((299 * r + 587 * g + 114 * b + 500) // 1000).astype(np.uint8)


def _skimage(name: str):
    """Loader of skimage.data.`name`() (the photos ship with scikit-image: no download)."""
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()
    return load


# photo -> (description, loader returning uint8 (H, W) or (H, W, 3))
_SOURCES = {
    "brick": ("skimage.data.brick()", _skimage("brick")),
    "grass": ("skimage.data.grass()", _skimage("grass")),
    "tissue": ("skimage.data.immunohistochemistry() (RGB)", _skimage("immunohistochemistry")),
    "tissue_gray": ("skimage.data.immunohistochemistry() as luma",
                    lambda: _luma(_skimage("immunohistochemistry")())),
    "weave": ("a plain weave with the grain of skimage.data.grass()", weave),
}


@functools.lru_cache(maxsize=None)
def photo(name: str) -> np.ndarray:
    """The uint8 photograph `name` (read-only): (H, W) when gray, (H, W, 3) when RGB."""
    if name not in PHOTOS:
        raise ValueError(f"unknown textures photo {name!r}; valid: {', '.join(PHOTOS)}")
    img = np.ascontiguousarray(_SOURCES[name][1](), dtype=np.uint8)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    expect = PHOTO_SHAPES[name]
    if img.shape != (expect[:2] if expect[2] == 1 else expect):
        raise RuntimeError(f"photo {name!r} has shape {img.shape}, PHOTO_SHAPES says {expect}")
    img.setflags(write=False)
    return img


def _check(config: TexturesConfig, split: str) -> None:
    """Validate the split name, that the split's region can hold a crop, and that the regions are disjoint."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    r0, r1, c0, c1 = config.region(split)
    h, w, _ = PHOTO_SHAPES[config.photo]
    s = config.crop_size
    if not (0 <= r0 and r1 <= h and r1 - r0 >= s and 0 <= c0 and c1 <= w and c1 - c0 >= s):
        raise ValueError(f"{split} region {config.region(split)} (rows, cols) of the {h}x{w} photo "
                         f"cannot hold a {s}px crop")
    a, b = config.train_region, config.test_region
    if a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]:
        raise ValueError(f"train region {a} and test region {b} overlap: choose disjoint ones")


def plan_split(config: TexturesConfig, split: str) -> list[CropSpec]:
    """Deterministic list of records of `split`: ids, kinds and crop origins."""
    _check(config, split)
    n = config.num(split)
    rng = np.random.default_rng([config.seed, _PHOTO_CODE[config.photo], _SPLIT_CODE[split]])
    r0, r1, c0, c1 = config.region(split)
    rows = rng.integers(r0, r1 - config.crop_size + 1, size=n)
    cols = rng.integers(c0, c1 - config.crop_size + 1, size=n)
    if split == "train":
        kinds = ["good"] * n
    else:
        n_defect = int(round(n * config.defect_fraction))
        kind_list = config.defect_kinds
        defect_kinds = [kind_list[i % len(kind_list)] for i in range(n_defect)]
        kinds = ["good"] * (n - n_defect) + defect_kinds
        kinds = [kinds[i] for i in rng.permutation(n)]
    width = max(3, len(str(n - 1)))
    counters: dict[str, int] = {}
    specs = []
    for i, kind in enumerate(kinds):
        k = counters.get(kind, 0)
        counters[kind] = k + 1
        specs.append(CropSpec(i, f"{kind}/{k:0{width}d}", kind, int(rows[i]), int(cols[i])))
    return specs


def clean_crop(config: TexturesConfig, spec: CropSpec) -> np.ndarray:
    """The crop of `spec` before any defect: uint8 (crop, crop, C), C = the photo's channels."""
    s = config.crop_size
    crop = photo(config.photo)[spec.row : spec.row + s, spec.col : spec.col + s]
    return np.array(crop if crop.ndim == 3 else crop[:, :, None])


def render(config: TexturesConfig, split: str, spec: CropSpec) -> dict[str, object]:
    """The record of `spec`: clean crop, plus its defect and exact mask for defect kinds."""
    clean = clean_crop(config, spec)
    mask = np.zeros(clean.shape[:2], dtype=bool)
    image = clean
    if spec.defect_type != "good":
        rng = np.random.default_rng(
            [config.seed, _PHOTO_CODE[config.photo], _SPLIT_CODE[split], spec.index]
        )
        image, mask = defects_lib.draw_visible(spec.defect_type, clean, rng)
    return {
        "image": image,
        "mask": mask.astype(np.uint8) * 255,
        "label": "good" if spec.defect_type == "good" else "defect",
        "defect_type": spec.defect_type,
        "id": spec.id,
    }


class Textures(tfds.core.GeneratorBasedBuilder):
    """Crops of texture photos from skimage (or made from them); test crops carry subtle drawn defects."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "Train and test regions side by side (columns) instead of one above the other."}
    BUILDER_CONFIGS = [make_config(p) for p in PHOTOS]
    DEFAULT_BUILDER_CONFIG_NAME = "brick"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        """This file. (TFDS's default probes `importlib_resources`, absent from the venv.)"""
        from etils import epath

        return epath.Path(__file__)

    def __init__(self, *, file_format: str = "array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.crop_size
        channels = PHOTO_SHAPES[self.builder_config.photo][2]
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(s, s, channels), dtype=np.uint8),
                    "mask": tfds.features.Tensor(shape=(s, s), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=["good", "defect"]),
                    "defect_type": tfds.features.Text(),
                    "id": tfds.features.Text(),
                }
            ),
            supervised_keys=None,
            homepage="https://scikit-image.org/docs/stable/api/skimage.data.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the photos ship with scikit-image
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        config = self.builder_config
        for spec in plan_split(config, split):
            yield spec.id, render(config, split, spec)
