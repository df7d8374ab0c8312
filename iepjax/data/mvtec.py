"""TFDS builders for MVTec AD (``mvtec_ad``) and any image folder in its layout (``mvtec_folder``).

Layout of one category (MVTec AD, Bergmann et al. 2019/2021)::

    <root>/<category>/train/good/*.png             normal training images
    <root>/<category>/test/good/*.png              normal test images (no masks)
    <root>/<category>/test/<kind>/NNN.png          defective test images
    <root>/<category>/ground_truth/<kind>/NNN_mask.png   their masks (nonzero = defect)

Images may be PNG, JPEG, BMP or TIFF, 8-bit gray or RGB, or gray of more than 8 bits (16-bit,
32-bit integer or float: read through the category's intensity window, the quantiles of its
training images' values, `layout.intensity_window`, recorded in the prepared data's metadata as
``intensity_window``), of any size (sizes may differ within a category). A defect kind without a ``ground_truth/<kind>/`` folder (or with an empty
one) has no masks: its images are kept for the image AUROC and skipped by the pixel metrics.
A kind whose folder holds masks must have one for every image.

* ``mvtec_ad``: one builder config per MVTec AD category (all 15). Manual download: the
  user points ``manual_dir`` at the extracted ``mvtec_anomaly_detection/`` folder, at the
  folder holding the category folders, or at ``mvtec_anomaly_detection.tar.xz``.
* ``mvtec_folder``: the same records from any folder in this layout; its config is made on
  the fly from the folder (name = ``<category>-<fingerprint of the file list>``, so a changed
  folder is prepared again and two folders never share a cache).

Records keep the original resolution and channels: ``image`` (uint8 HxWxC, PNG-encoded),
``mask`` (uint8 HxWx1, 0/255, all zero for good images), ``has_mask`` (False for defect
images of a kind without masks), ``label`` (good/defect), ``defect_type``, ``id``
(``"<defect_type>/<file stem>"``) and ``file_name`` (path relative to the category folder).
Storage is array_record; read with ``builder.as_data_source(split)`` (no TensorFlow).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from iepjax.data.layout import (  # noqa: F401 (re-exported)
    ARCHIVE_NAME, GRAY_CATEGORIES, HOMEPAGE, IMAGE_EXTENSIONS, MANUAL_DOWNLOAD_INSTRUCTIONS, MVTEC_CATEGORIES,
    SPLITS, TEXTURE_CATEGORIES, DataError, Entry, category_channels, extract_category, extract_dir, fingerprint,
    image_channels, intensity_window, kinds_without_masks, load_entry, locate_root, read_image, read_mask,
    scan_category)


# --------------------------------------------------------------------------- builders


@dataclasses.dataclass(eq=False, kw_only=True)
class MvtecConfig(tfds.core.BuilderConfig):
    """One category: its folder name, channel count, and (folder builder) the source folder."""

    category: str = "carpet"
    channels: int = 3
    source: str = ""  # folder builder only: the root holding category/


def mvtec_config(category: str) -> MvtecConfig:
    """The registered config of an MVTec AD category."""
    if category not in MVTEC_CATEGORIES:
        raise ValueError(f"unknown MVTec AD category {category!r}; valid: {', '.join(MVTEC_CATEGORIES)}")
    return MvtecConfig(name=category, description=f"MVTec AD {category}", category=category,
                       channels=1 if category in GRAY_CATEGORIES else 3)


def folder_config(root: str | os.PathLike, category: str) -> MvtecConfig:
    """A config for `root/category` (checks the layout; channels from the images' headers)."""
    root = Path(root).expanduser().resolve()
    entries = scan_category(root, category)
    return MvtecConfig(name=f"{category}-{fingerprint(root, category)}",
                       description=f"images of {root / category} (MVTec AD layout)",
                       category=category, channels=category_channels(entries), source=str(root))


class _LayoutBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared record format and generation of the MVTec-layout builders."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        """This file. (TFDS's default probes `importlib_resources`, absent from the venv.)"""
        from etils import epath
        return epath.Path(__file__)

    def __init__(self, *, file_format: str = "array_record", progress: bool = True, **kwargs):
        self._show_progress = progress
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config.channels
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, c), encoding_format="png"),
                "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                "has_mask": tfds.features.Tensor(shape=(), dtype=np.bool_),
                "label": tfds.features.ClassLabel(names=["good", "defect"]),
                "defect_type": tfds.features.Text(),
                "id": tfds.features.Text(),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=None,
            homepage=HOMEPAGE,
            metadata=tfds.core.MetadataDict(),  # "intensity_window": [lo, hi] for high-depth images
        )

    def _root(self, dl_manager) -> Path:
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        root = self._root(dl_manager)
        category = self.builder_config.category
        entries = scan_category(root, category)
        missing = kinds_without_masks(entries)
        print(f"preparing {self.name}/{category} from {root / category} "
              f"({sum(e.split == 'train' for e in entries)} train, {sum(e.split == 'test' for e in entries)} test "
              f"images; written once, later runs read it)" +
              (f"; no masks for {', '.join(missing)}: pixel metrics will skip those images" if missing else ""),
              file=sys.stderr)
        window = intensity_window([e.path for e in entries if e.split == "train"])
        if window is not None:
            self.info.metadata["intensity_window"] = list(window)
            print(f"high-depth images: read through the training images' intensity window [{window[0]:g}, "
                  f"{window[1]:g}] -> [0, 255]", file=sys.stderr)
        return {split: self._generate_examples([e for e in entries if e.split == split], split, window)
                for split in SPLITS}

    def _generate_examples(self, entries: list[Entry], split: str,
                           window: tuple[float, float] | None = None) -> Iterator[tuple[str, dict]]:
        channels = self.builder_config.channels
        it = entries
        if self._show_progress:
            from tqdm.auto import tqdm
            it = tqdm(entries, desc=f"prepare {self.builder_config.category} {split}", unit="img",
                      dynamic_ncols=True, file=sys.stderr)
        for e in it:
            yield e.id, load_entry(e, channels, window)


class MvtecAd(_LayoutBuilder):
    """MVTec AD (Bergmann et al.), one config per category; manual download (CC BY-NC-SA 4.0)."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [mvtec_config(c) for c in MVTEC_CATEGORIES]
    DEFAULT_BUILDER_CONFIG_NAME = "carpet"

    def _root(self, dl_manager) -> Path:
        manual = getattr(dl_manager, "_manual_dir", None)
        if manual is None or not Path(os.fspath(manual)).exists():
            raise DataError(f"MVTec AD {self.builder_config.category!r} is not prepared yet and no download was found "
                            f"(manual_dir {manual}): pass --manual-dir PATH.\n" + MANUAL_DOWNLOAD_INSTRUCTIONS)
        return locate_root(os.fspath(manual), self.builder_config.category, extract_dir(self._data_dir_root))


class MvtecFolder(_LayoutBuilder):
    """Any folder in the MVTec AD layout; configs come from `folder_config(root, category)`."""

    BUILDER_CONFIGS = []

    def _root(self, dl_manager) -> Path:
        del dl_manager
        return Path(self.builder_config.source)
