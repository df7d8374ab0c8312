"""Datasets as numpy arrays, built with tensorflow-datasets (array_record, no TensorFlow).

``load_split("textures", "brick", "test")`` prepares the dataset on first use
(``download_and_prepare`` into ``data_dir``; default ``$IEPJAX_DATA_DIR`` else
``~/tensorflow_datasets``) and reads it back with ``builder.as_data_source``.
tensorflow_datasets is imported lazily, so importing this package is cheap.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import NamedTuple

import numpy as np

CATEGORIES: dict[str, tuple[str, ...]] = {"textures": ("brick", "grass")}
SPLITS = ("train", "test")


class Split(NamedTuple):
    """One split as numpy: images (N,H,W,C) uint8, masks (N,H,W) bool, labels (N,) int (1 = defect)."""

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    defect_types: list[str]
    ids: list[str]


def default_data_dir() -> str:
    """$IEPJAX_DATA_DIR if set, else ~/tensorflow_datasets."""
    return os.environ.get("IEPJAX_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _validate(dataset: str, category: str) -> None:
    """Raise ValueError listing the valid names for an unknown dataset or category."""
    if dataset not in CATEGORIES:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(CATEGORIES)}")
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


def get_builder(dataset: str, category: str, data_dir: str | None = None, **overrides):
    """The TFDS builder of `dataset`/`category` (not prepared). `overrides`: config fields (seed, num_train, ...)."""
    _validate(dataset, category)
    data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
    if dataset == "textures":
        from iepjax.data import textures

        config = textures.make_config(category, **overrides)
        if not overrides:  # use the registered config object itself
            config = category
        with _quiet_tfds():
            return textures.Textures(config=config, data_dir=data_dir)
    raise AssertionError("unreachable")  # pragma: no cover


def load_split(
    dataset: str, category: str, split: str, data_dir: str | None = None, **overrides
) -> Split:
    """Load `split` of `dataset`/`category` as numpy, preparing the dataset on first use.

    `overrides` are builder-config fields (e.g. ``seed=1, num_train=16``); non-default
    values get their own config name, hence their own directory under `data_dir`.
    Records are returned sorted by id.
    """
    _validate(dataset, category)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    builder = get_builder(dataset, category, data_dir, **overrides)
    with _quiet_tfds():
        builder.download_and_prepare()
        source = builder.as_data_source(split)
        records = [source[i] for i in range(len(source))]
    records.sort(key=lambda r: _text(r["id"]))
    return Split(
        images=np.stack([np.asarray(r["image"], dtype=np.uint8) for r in records]),
        masks=np.stack([np.asarray(r["mask"]) > 0 for r in records]),
        labels=np.asarray([int(r["label"]) for r in records], dtype=np.int64),
        defect_types=[_text(r["defect_type"]) for r in records],
        ids=[_text(r["id"]) for r in records],
    )


def _text(value) -> str:
    """TFDS Text features come back as bytes from as_data_source; return str."""
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


__all__ = ["CATEGORIES", "SPLITS", "Split", "default_data_dir", "get_builder", "load_split"]
