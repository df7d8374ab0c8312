"""argparse types shared by the command-line scripts (train.py, project.py, tools/, benchmarks/).

Imports nothing but the standard library: the benchmark scripts load this file by path under a
PyTorch-only interpreter, where the iepjax package (jax) cannot be imported.
"""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type for counts such as --cpu-devices or --steps: an int >= 1, else a usage error naming the value."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: give 1 or more")
    return n
