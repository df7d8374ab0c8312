"""Datasets as numpy arrays, built with tensorflow-datasets (array_record, no TensorFlow).

``load_split("textures", "brick", "test")`` prepares the dataset on first use
(``download_and_prepare`` into ``data_dir``; default ``$IEPJAX_DATA_DIR`` else
``~/tensorflow_datasets``) and reads it back with ``builder.as_data_source``.
tensorflow_datasets is imported lazily, so importing this package is cheap.

Datasets: ``textures`` (built in, see textures.py), ``mvtec_ad`` (MVTec AD, manual download:
``source_dir`` = the extracted folder or the .tar.xz, needed only the first time a category is
prepared) and ``folder`` (any folder in the MVTec AD layout: ``source_dir`` = the folder holding
``<category>/``; any category name). See mvtec.py and docs/datasets.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import NamedTuple

import numpy as np

from iepjax.data.layout import DataError, MVTEC_CATEGORIES, TEXTURE_CATEGORIES  # no TFDS import

CATEGORIES: dict[str, tuple[str, ...]] = {"textures": ("brick", "grass", "tissue", "tissue_gray", "weave"),
                                          "mvtec_ad": MVTEC_CATEGORIES,
                                          "folder": ()}  # folder: any category name
SPLITS = ("train", "test")


class Split(NamedTuple):
    """One split as numpy: images (N,H,W,C) uint8, masks (N,H,W) bool, labels (N,) int (1 = defect).

    When the images of a split differ in size, `images` and `masks` are lists of (H_i, W_i, C)
    / (H_i, W_i) arrays instead of stacked arrays (use `sizes()` / `iepjax.data.preprocess`).
    has_mask (N,) bool: False for defect images of a kind without ground truth (None: all have).
    file_names: source file of each image relative to its category folder (None: not files).
    intensity_window: (lo, hi) through which high-depth image files became uint8 (`iepjax.data.
    layout.intensity_window`); None for 8-bit data.
    """

    images: np.ndarray | list
    masks: np.ndarray | list
    labels: np.ndarray
    defect_types: list[str]
    ids: list[str]
    has_mask: np.ndarray | None = None
    file_names: list[str] | None = None
    intensity_window: tuple[float, float] | None = None

    def sizes(self) -> list[tuple[int, int]]:
        """(H, W) of each image."""
        return [tuple(int(v) for v in np.shape(im)[:2]) for im in self.images]

    def mask_or_none(self) -> list:
        """Masks with None where an image has no ground truth (for `iepjax.metrics.evaluate`)."""
        hm = self.has_mask if self.has_mask is not None else np.ones(len(self.ids), bool)
        return [m if h else None for m, h in zip(self.masks, hm)]


def default_data_dir() -> str:
    """$IEPJAX_DATA_DIR if set, else ~/tensorflow_datasets."""
    return os.environ.get("IEPJAX_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _validate(dataset: str, category: str) -> None:
    """Raise ValueError listing the valid names for an unknown dataset or category."""
    if dataset not in CATEGORIES:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(CATEGORIES)}")
    if dataset == "folder":
        if not category or "/" in category or category.startswith("."):
            raise ValueError(f"invalid category {category!r}: give the name of a folder under the data folder")
        return
    if category not in CATEGORIES[dataset]:
        raise ValueError(
            f"unknown category {category!r} for dataset {dataset!r}; "
            f"valid categories: {', '.join(CATEGORIES[dataset])}"
        )


@contextlib.contextmanager
def _quiet_tfds():
    """Silence TFDS's INFO/WARNING chatter (absl logger) and progress bars while building/reading."""
    import tensorflow_datasets as tfds

    loggers = [logging.getLogger(n) for n in ("absl", "tensorflow_datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    tfds.disable_progress_bar()
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def get_builder(dataset: str, category: str, data_dir: str | None = None, *, source_dir: str | None = None,
                progress: bool = True, **overrides):
    """The TFDS builder of `dataset`/`category` (not prepared). `overrides`: config fields (seed, num_train, ...).

    `source_dir`: for ``folder``, the folder holding ``<category>/`` (required); for ``mvtec_ad``,
    the MVTec AD download (see `iepjax.data.mvtec.locate_root`), passed as TFDS's manual_dir.
    """
    _validate(dataset, category)
    data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
    if dataset in ("mvtec_ad", "folder"):
        from iepjax.data import mvtec
        if overrides:
            raise ValueError(f"{dataset} has no config fields to override (got {sorted(overrides)})")
        if dataset == "folder":
            if source_dir is None:
                raise ValueError("dataset 'folder' needs the data folder (--data-dir DIR holding DIR/<category>/)")
            config = mvtec.folder_config(source_dir, category)
            with _quiet_tfds():
                return mvtec.MvtecFolder(config=config, data_dir=data_dir, progress=progress)
        with _quiet_tfds():
            return mvtec.MvtecAd(config=category, data_dir=data_dir, progress=progress)
    if dataset == "textures":
        from iepjax.data import textures

        config = textures.make_config(category, **overrides)
        if not overrides:  # use the registered config object itself
            config = category
        with _quiet_tfds():
            return textures.Textures(config=config, data_dir=data_dir)
    raise AssertionError("unreachable")  # pragma: no cover


def prepare(builder, source_dir: str | None = None) -> None:
    """download_and_prepare `builder` (a no-op once prepared); `source_dir` is the manual dir for mvtec_ad."""
    import tensorflow_datasets as tfds
    from iepjax.data import mvtec

    kwargs = {}
    if isinstance(builder, mvtec.MvtecAd) and source_dir is not None:
        kwargs["download_config"] = tfds.download.DownloadConfig(
            manual_dir=os.path.expanduser(os.fspath(source_dir)))
    with _quiet_tfds():
        builder.download_and_prepare(**kwargs)
    if isinstance(builder, mvtec.MvtecAd):  # drop a category extracted from the .tar.xz once prepared
        import shutil
        shutil.rmtree(mvtec.extract_dir(builder.data_dir_root) / f"extract_{builder.builder_config.category}",
                      ignore_errors=True)


def _stack_or_list(arrays: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """One stacked array when all shapes agree, else the list."""
    if arrays and all(a.shape == arrays[0].shape for a in arrays):
        return np.stack(arrays)
    return arrays


def load_split(
    dataset: str, category: str, split: str, data_dir: str | None = None, *, source_dir: str | None = None,
    progress: bool = True, **overrides
) -> Split:
    """Load `split` of `dataset`/`category` as numpy, preparing the dataset on first use.

    `overrides` are builder-config fields (e.g. ``seed=1, num_train=16``); non-default
    values get their own config name, hence their own directory under `data_dir`.
    `source_dir`: the image folder (``folder``) or MVTec AD download (``mvtec_ad``).
    Records are returned sorted by id; images of different sizes come back as lists.
    """
    _validate(dataset, category)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    builder = get_builder(dataset, category, data_dir, source_dir=source_dir, progress=progress, **overrides)
    prepare(builder, source_dir)
    with _quiet_tfds():
        source = builder.as_data_source(split)
        records = [source[i] for i in range(len(source))]
    records.sort(key=lambda r: _text(r["id"]))
    images = [np.asarray(r["image"], dtype=np.uint8) for r in records]
    masks = [np.asarray(r["mask"]).reshape(im.shape[:2]) > 0 for r, im in zip(records, images)]
    return Split(
        images=_stack_or_list(images),
        masks=_stack_or_list(masks),
        labels=np.asarray([int(r["label"]) for r in records], dtype=np.int64),
        defect_types=[_text(r["defect_type"]) for r in records],
        ids=[_text(r["id"]) for r in records],
        has_mask=np.asarray([bool(r.get("has_mask", True)) for r in records], dtype=bool),
        file_names=[_text(r["file_name"]) for r in records] if records and "file_name" in records[0] else None,
        intensity_window=_window(builder),
    )


def _window(builder) -> tuple[float, float] | None:
    """The intensity window a prepared folder's high-depth images were read through (None: 8-bit data)."""
    w = (builder.info.metadata or {}).get("intensity_window")
    return None if w is None else (float(w[0]), float(w[1]))


def _text(value) -> str:
    """TFDS Text features come back as bytes from as_data_source; return str."""
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


__all__ = ["CATEGORIES", "SPLITS", "DataError", "dataset_and_source", "MVTEC_CATEGORIES", "Split", "TEXTURE_CATEGORIES",
           "default_data_dir", "get_builder", "load_split", "prepare"]


def dataset_and_source(dataset: str, data_dir: str | None, manual_dir: str | None) -> tuple[str, str | None]:
    """The scripts' --dataset/--data-dir/--manual-dir -> (dataset, source folder for the builder).

    --data-dir names your own image folder and means dataset "folder"; ValueError if another
    dataset was asked for too.
    """
    if data_dir is not None:
        if dataset not in ("textures", "folder"):
            raise ValueError("--data-dir is your own image folder: leave out --dataset (or use --dataset folder)")
        dataset = "folder"
    return dataset, (data_dir if dataset == "folder" else manual_dir)
