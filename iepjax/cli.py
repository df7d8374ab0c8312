"""argparse types shared by the command-line scripts (train.py, project.py, tools/, benchmarks/).

Imports nothing but the standard library: the benchmark scripts load this file by path under a
PyTorch-only interpreter, where the iepjax package (jax) cannot be imported. (`model_size`, for
the iepjax scripts only, imports the package's config when it is called.)
"""
from __future__ import annotations

import argparse


def _int(text: str, least: int) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < least:
        raise argparse.ArgumentTypeError(f"{n}: give {least} or more")
    return n


def positive_int(text: str) -> int:
    """argparse type for counts such as --cpu-devices or --steps: an int >= 1, else a usage error naming the value."""
    return _int(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type for counts that may be 0, such as project.py --steps (T = 0 returns x0)."""
    return _int(text, 0)


def _float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number")
    return x


def positive_float(text: str) -> float:
    """argparse type for rates such as --lr: a finite number > 0."""
    x = _float(text)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"{x}: give a number above 0")
    return x


def nonnegative_float(text: str) -> float:
    """argparse type for weights and widths that may be 0, such as --alpha, --lam, --sigma."""
    x = _float(text)
    if x < 0:
        raise argparse.ArgumentTypeError(f"{x}: give 0 or more")
    return x


def quantile(text: str) -> float:
    """argparse type for a quantile q in (0, 1], such as --pixel-quantile 0.995."""
    x = _float(text)
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"{x}: a quantile is in (0, 1], e.g. 0.995")
    return x


def fraction(text: str) -> float:
    """argparse type for a share in [0, 1), such as train.py --holdout 0.1."""
    x = _float(text)
    if not 0 <= x < 1:
        raise argparse.ArgumentTypeError(f"{x}: give a fraction in [0, 1), e.g. 0.1")
    return x


def model_size(text: str) -> int:
    """argparse type for a model input size (train.py --size, reproduce.py --image-size): ModelConfig's rule."""
    n = _int(text, 1)
    from iepjax.config import SIZE_RULE, size_ok  # the rule lives with ModelConfig
    if not size_ok(n):
        raise argparse.ArgumentTypeError(f"{n}: {SIZE_RULE}")
    return n
