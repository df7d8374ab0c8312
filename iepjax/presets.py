"""Per-category defaults in one table: model input, training length, projection settings.

Projection defaults (steps, alpha, lam, smoothing) were calibrated on the built-in textures
(see README, "Calibration"); every value can be overridden by a flag.
"""
from __future__ import annotations

_TEXTURE = dict(kind="texture", size=128, channels=1, likelihood="bce", decoder="upsample",
                train_steps=400, batch_size=32, learning_rate=2e-4,
                proj_steps=100, alpha=0.5, lam=0.05, smoothing_sigma=2.0)

PRESETS: dict[tuple[str, str], dict] = {
    ("textures", "brick"): dict(_TEXTURE),
    ("textures", "grass"): dict(_TEXTURE),
}


def preset(dataset: str, category: str) -> dict:
    """The defaults of dataset/category; ValueError listing the known ones otherwise."""
    try:
        return dict(PRESETS[(dataset, category)])
    except KeyError:
        known = ", ".join(f"{d}/{c}" for d, c in PRESETS)
        raise ValueError(f"unknown dataset/category {dataset}/{category}: known are {known}") from None
