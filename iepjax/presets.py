"""Per-category defaults in one table: model input, training length, projection settings.

Projection defaults (steps, alpha, lam, smoothing) were calibrated on the built-in textures
(see README, "Calibration"); every value can be overridden by a flag.
"""
from __future__ import annotations

# Built-in textures, measured on this project's 2-core CPU (README, "Calibration"; tools/calibrate.py):
# 64 px model inputs (patches of the 128 px crops, below) so that training + projection of brick fit
# the README's 10-minute budget; Gaussian likelihood with learned gamma (BCE measured beside it, README
# "Likelihood"); transposed-conv decoder (Bergmann et al. 2018); Adam lr 5e-4 (2.5x the paper's, for
# the short budget; 1e-3 diverged), 5000 steps of 16 (better than 2500 of 32 in the same time).
# Projection: alpha 0.02 (with the Gaussian 'sum' loss the step is ~alpha e^3 / gamma^2 per pixel,
# so alpha is ~25x smaller than the ports' 0.5 for BCE), 100 steps, sigma 1 px, lam 15 (the prior's gradient
# must be on the scale of (x - f) / gamma^2 ~ 1000 e to hold pixels of small error e at x0; 0.05 did nothing;
# lam 15 against 10: a higher grad pixel AUROC on the calibration split for each of 5 trained models, lam 20 no
# better, README "Calibration").
_TEXTURE = dict(kind="texture", size=64, channels=1, likelihood="gaussian", decoder="transposed",
                train_steps=5000, batch_size=16, learning_rate=5e-4,
                proj_steps=100, alpha=0.02, lam=15.0, smoothing_sigma=1.0)

PRESETS: dict[tuple[str, str], dict] = {
    ("textures", "brick"): dict(_TEXTURE),
    ("textures", "grass"): dict(_TEXTURE),
}

# --- MVTec AD and own folders (issue 3; iepjax.data.mvtec, iepjax.data.preprocess) -------------
# kind "texture": training on random crops (patches_per_epoch of them) of the image brought to a
# working resolution whose short side is size / texture_fov, flips + 90-degree rotations; test
# images tiled at that scale. kind "object": whole image resized to size x size, no augmentation
# (a flipped metal_nut or a rotated transistor is a defect). Training length for MVTec AD is not
# given by the paper: 10 000 steps x 32 = 32 epochs of 10 000 patches, a documented guess.
# The built-in textures are 128 px crops: texture_fov 0.5 trains on random 64 px patches of them at
# full resolution and tiles each test crop into 4 patches. Measured against resizing the whole crop
# to 64 px (texture_fov 1.0), same training time (measured on version 1.0.0 of the data, rows split):
# brick pixel AUROC 0.75 -> 0.92 (both rows), the
# model's squared error 0.19 -> 0.09 of the mean predictor's (README, "Calibration").
# tile_step 0.5: the test tiles overlap by half (stride 32 px, 9 tiles per crop instead of 4), blended
# by distance from the tile border (preprocess.stitch). On the seed-1 split of brick it raised pixel
# AUROC / AU-PRO of both rows (recon 0.742 / 0.576 -> 0.750 / 0.597, grad 0.771 / 0.617 -> 0.778 /
# 0.639) for 2.1x the projection time (~20 s more); averaging the overlaps instead gave +0.001.
for _k in PRESETS:
    PRESETS[_k].update(augment=True, texture_fov=0.5, patches_per_epoch=10000, tile_step=0.5)
_MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
_MVTEC_OBJECTS = ("bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw", "toothbrush",
                  "transistor", "zipper")
_MVTEC_GRAY = ("grid", "screw", "zipper")
# Likelihood, decoder and projection as chosen on the built-in textures (README, "Likelihood" and
# "Calibration"), not tuned on MVTec AD; sigma 2 px at 128 px is the 1 px calibrated at 64 px.
# Test tiles do not overlap here (no tile_step): half-overlapping tiles would cost 3x the projection
# (49 instead of 16 tiles of a 512 px working image) and were not measured on MVTec AD
# (train.py --tile-stride 64 turns them on).
_MVTEC = dict(size=128, likelihood="gaussian", decoder="transposed", train_steps=10000, batch_size=32,
              learning_rate=2e-4, proj_steps=100, alpha=0.02, lam=15.0, smoothing_sigma=2.0)
_MVTEC_TEXTURE = dict(_MVTEC, kind="texture", augment=True, texture_fov=0.25, patches_per_epoch=10000)
_MVTEC_OBJECT = dict(_MVTEC, kind="object", augment=False)
for _c in _MVTEC_TEXTURES + _MVTEC_OBJECTS:
    PRESETS[("mvtec_ad", _c)] = dict(_MVTEC_TEXTURE if _c in _MVTEC_TEXTURES else _MVTEC_OBJECT,
                                     channels=1 if _c in _MVTEC_GRAY else 3)
# Own folders (dataset "folder", any category name): an MVTec AD category name gets that
# category's row; any other name the object row (train.py --kind texture switches).
FOLDER_DEFAULT = dict(_MVTEC_OBJECT, channels=3)


def preset(dataset: str, category: str) -> dict:
    """The defaults of dataset/category; ValueError listing the known ones otherwise."""
    if dataset == "folder":
        return dict(PRESETS.get(("mvtec_ad", category), FOLDER_DEFAULT))
    try:
        return dict(PRESETS[(dataset, category)])
    except KeyError:
        known = ", ".join(f"{d}/{c}" for d, c in PRESETS)
        raise ValueError(f"unknown dataset/category {dataset}/{category}: known are {known}") from None


# alpha and lam follow the scale of the model's loss (README, "Projection"): the values above are
# for the Gaussian likelihood the presets train with. A model trained with `--likelihood bce` gets
# the public ports' BCE values (method.md: alpha 0.5, lam 0.05), not calibrated here.
LIKELIHOOD_PROJECTION = {"bce": dict(alpha=0.5, lam=0.05)}


def projection_preset(dataset: str, category: str, likelihood: str | None = None) -> dict:
    """The projection defaults (proj_steps, alpha, lam, smoothing_sigma) for a model of this
    dataset/category trained with `likelihood`: the category preset's, with alpha and lam for
    that likelihood where the preset was calibrated for another one."""
    pre = preset(dataset, category)
    out = {k: pre[k] for k in ("proj_steps", "alpha", "lam", "smoothing_sigma")}
    if likelihood is not None and likelihood != pre["likelihood"]:
        out.update(LIKELIHOOD_PROJECTION.get(likelihood, {}))
    return out
