"""TFDS builder ``textures``: crops of real texture photos with drawn, subtle defects.

Configs ``brick`` and ``grass`` use ``skimage.data.brick()`` / ``grass()`` (512x512
grayscale photographs).  Records follow the MVTec AD layout used by this project:
``image`` (uint8 HxWx1), ``mask`` (uint8 HxW, 0/255), ``label`` (good/defect),
``defect_type`` and ``id`` (``"<defect_type>/<NNN>"``).

* ``train``: ``num_train`` good crops inside ``train_region`` (default: all rows, columns 0..319).
* ``test``: ``num_test`` crops inside ``test_region`` (default: all rows, columns 320..511), so
  train and test never share a pixel; ``defect_fraction`` of them get one defect each,
  kinds balanced over ``defect_kinds`` (default :data:`DEFAULT_DEFECT_KINDS`, the four kinds
  that add structure; the detail-loss kinds of :mod:`iepjax.data.defects` on request).

The regions are side by side (columns), not one above the other: the brick photo is taken at
an angle, its bricks grow from the top to the bottom of the photo, so a split by rows gave test
crops of another scale than every training crop (and heat maps of good test crops that light up
on the mortar joints). Split by columns, both regions hold every scale; the bricks lean one way
on the left and the other on the right, which the training's horizontal flips cover.

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

PHOTOS = ("brick", "grass")
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
    train_region=(0, 512, 0, 320),
    test_region=(0, 512, 320, 512),
    defect_fraction=0.5,
    defect_kinds=DEFAULT_DEFECT_KINDS,
)


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
    params = {**_DEFAULTS, **overrides}
    params["train_region"] = tuple(int(v) for v in params["train_region"])
    params["test_region"] = tuple(int(v) for v in params["test_region"])
    params["defect_kinds"] = _check_kinds(params["defect_kinds"])
    changed = {k: v for k, v in params.items() if v != _DEFAULTS[k]}
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
        description=f"skimage.data.{photo}() crops, {params}",
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


@functools.lru_cache(maxsize=None)
def photo(name: str) -> np.ndarray:
    """The 512x512 uint8 grayscale photograph `name` from skimage.data (read-only)."""
    import skimage.data

    if name not in PHOTOS:
        raise ValueError(f"unknown textures photo {name!r}; valid: {', '.join(PHOTOS)}")
    img = np.ascontiguousarray(getattr(skimage.data, name)(), dtype=np.uint8)
    img.setflags(write=False)
    return img


def _check(config: TexturesConfig, split: str) -> None:
    """Validate the split name, that the split's region can hold a crop, and that the regions are disjoint."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    r0, r1, c0, c1 = config.region(split)
    h, w = photo(config.photo).shape
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
    """The crop of `spec` before any defect: uint8 (crop, crop, 1)."""
    s = config.crop_size
    return np.array(photo(config.photo)[spec.row : spec.row + s, spec.col : spec.col + s, None])


def render(config: TexturesConfig, split: str, spec: CropSpec) -> dict[str, object]:
    """The record of `spec`: clean crop, plus its defect and exact mask for defect kinds."""
    clean = clean_crop(config, spec)
    mask = np.zeros(clean.shape[:2], dtype=bool)
    image = clean
    if spec.defect_type != "good":
        rng = np.random.default_rng(
            [config.seed, _PHOTO_CODE[config.photo], _SPLIT_CODE[split], spec.index]
        )
        x = clean.astype(np.float32) / 255.0
        for _ in range(100):  # redraw (deterministically) until the uint8 change is real
            out, m = defects_lib.apply_defect(spec.defect_type, x, rng)
            q = np.rint(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)
            q = np.where(m[..., None], q, clean)  # outside the mask: bit-identical to clean
            if m.sum() >= 4 and (q != clean)[m].mean() > 0.5:
                image, mask = q, m
                break
        else:  # pragma: no cover - would mean the defect parameters are broken
            raise RuntimeError(f"could not draw a visible {spec.defect_type} on {spec.id}")
    return {
        "image": image,
        "mask": mask.astype(np.uint8) * 255,
        "label": "good" if spec.defect_type == "good" else "defect",
        "defect_type": spec.defect_type,
        "id": spec.id,
    }


class Textures(tfds.core.GeneratorBasedBuilder):
    """Crops of skimage brick/grass photos; test crops carry subtle drawn defects."""

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
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(s, s, 1), dtype=np.uint8),
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
