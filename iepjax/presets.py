"""Per-category defaults, returned as the configs the library takes.

    train_config(dataset, category)       -> TrainConfig (model, steps, batch, lr, augmentation)
    preprocess(dataset, category)         -> Preprocess (objects resized, textures cropped / tiled)
    projection_config(dataset, category)  -> ProjectionConfig (T, step and hold, smoothing)
    ThresholdConfig()                     -> the same for every category (iepjax.config)

The scripts change single fields with `dataclasses.replace`. How the values were chosen:
docs/calibration.md.
"""
from __future__ import annotations

from iepjax.config import ModelConfig, ProjectionConfig, TrainConfig, model_config
from iepjax.data.preprocess import AUTO_STRIDE, Preprocess

# The projection's step and prior in the model's own units (`ProjectionConfig.step` / `hold`, resolved
# on each run's held-out normal images): the values that give the built-in brick VAE the alpha 0.02
# and lam 15 calibrated for it (docs/calibration.md, "Projection").
_RELATIVE = dict(step=1.07e-3, hold=0.37)
# Built-in textures: 64 px patches, Gaussian likelihood (docs/calibration.md).
_TEXTURE = dict(kind="texture", size=64, channels=1, likelihood="gaussian", decoder="transposed",
                train_steps=5000, batch_size=16, learning_rate=5e-4,
                proj_steps=100, alpha=0.02, lam=15.0, **_RELATIVE, smoothing_sigma=1.0,
                augment=True, texture_fov=0.5, patches_per_epoch=10000, tile_step=0.5)

PRESETS: dict[tuple[str, str], dict] = {
    ("textures", "brick"): dict(_TEXTURE),
    ("textures", "grass"): dict(_TEXTURE),
    ("textures", "tissue"): dict(_TEXTURE, channels=3),
    ("textures", "tissue_gray"): dict(_TEXTURE),
    ("textures", "weave"): dict(_TEXTURE),
}

# MVTec AD: 128 px, textures tiled at a working resolution, objects resized (docs/calibration.md).
_MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
_MVTEC_OBJECTS = ("bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw", "toothbrush",
                  "transistor", "zipper")
_MVTEC_GRAY = ("grid", "screw", "zipper")
_MVTEC = dict(size=128, likelihood="gaussian", decoder="transposed", train_steps=10000, batch_size=32,
              learning_rate=2e-4, proj_steps=100, alpha=0.02, lam=15.0, **_RELATIVE, smoothing_sigma=2.0)
_MVTEC_TEXTURE = dict(_MVTEC, kind="texture", augment=True, texture_fov=0.25, patches_per_epoch=10000)
_MVTEC_OBJECT = dict(_MVTEC, kind="object", augment=False)
for _c in _MVTEC_TEXTURES + _MVTEC_OBJECTS:
    PRESETS[("mvtec_ad", _c)] = dict(_MVTEC_TEXTURE if _c in _MVTEC_TEXTURES else _MVTEC_OBJECT,
                                     channels=1 if _c in _MVTEC_GRAY else 3)
# Own folders: an MVTec AD category's name gets its row, any other the object row (docs/calibration.md).
FOLDER_DEFAULT = dict(_MVTEC_OBJECT, channels=3)

# The projection for a model trained with another loss than the preset's (docs/calibration.md): the
# public ports' BCE values, as given; for the AEs, step and hold chosen on the calibration split
# (data seed 1), with the alpha and lam they gave the brick AEs.
LIKELIHOOD_PROJECTION = {"bce": dict(alpha=0.5, lam=0.05, step=None, hold=None),
                         "l2": dict(alpha=10.4, lam=0.033, step=1.07e-3, hold=0.37),
                         "ssim": dict(alpha=0.142, lam=3.48, step=2e-3, hold=0.37)}


def _folder_row(category: str) -> dict:
    """An own folder's row: the MVTec AD category's of that name, else FOLDER_DEFAULT (not a copy)."""
    return PRESETS.get(("mvtec_ad", category), FOLDER_DEFAULT)


def _row(dataset: str, category: str) -> dict:
    """The table's row of dataset/category; ValueError listing the known ones otherwise."""
    if dataset == "folder":
        return dict(_folder_row(category))
    try:
        return dict(PRESETS[(dataset, category)])
    except KeyError:
        known = ", ".join(f"{d}/{c}" for d, c in PRESETS)
        raise ValueError(f"unknown dataset/category {dataset}/{category}: known are {known}") from None


def kind_note(dataset: str, category: str, kind: str | None) -> str | None:
    """What train.py tells a user whose own folder gets the object row by default (a category name
    that is not an MVTec AD one, and no `kind` given), or None."""
    if dataset != "folder" or kind is not None or _folder_row(category) is not FOLDER_DEFAULT:
        return None
    return (f"note: {category} is not an MVTec AD category name, so its images are treated as objects: each "
            f"resized whole to {FOLDER_DEFAULT['size']} px, no flips or rotations. For a surface or texture (the same "
            "pattern throughout, defects anywhere), train with --kind texture (docs/datasets.md)")


def check(dataset: str, category: str) -> None:
    """ValueError naming the known categories when dataset/category has no preset."""
    _row(dataset, category)


def train_config(dataset: str, category: str, *, size: int | None = None, kind: str | None = None,
                 model: str = "vae") -> TrainConfig:
    """The category's training settings for the paper's `model` ("vae", "ae_l2", "ae_ssim": the same
    architecture, `config.model_config`); `size` (model input) and `kind` ("texture": augmented
    with flips and rotations, "object": not) override the preset's."""
    pre = _row(dataset, category)
    arch = ModelConfig(size=size or pre["size"], channels=pre["channels"], likelihood=pre["likelihood"],
                       decoder=pre["decoder"])
    model = model_config(model, arch)
    return TrainConfig(model=model, steps=pre["train_steps"], batch_size=pre["batch_size"],
                       learning_rate=pre["learning_rate"], free_bits=pre.get("free_bits", 0.0),
                       kl_warmup=pre.get("kl_warmup", 0),
                       augment=pre.get("augment", True) if kind is None else kind == "texture")


def preprocess(dataset: str, category: str, *, size: int | None = None, kind: str | None = None,
               tile_stride: int | None = None, texture_fov: float | None = None) -> Preprocess:
    """The category's preprocessing (size / kind / tile_stride / texture_fov override the preset).

    The preset's `tile_step` is the test-time tile stride as a fraction of the model size (0.5 for
    the built-in textures: tiles overlap by half); `tile_stride` gives it in pixels instead. Rows
    without one (MVTec AD, own folders) leave it to the training images' size (`AUTO_STRIDE`,
    resolved by `Preprocess.with_tile_stride`): overlapping by half where that stays within
    `MAX_TILES` tiles an image, as on the built-in textures; an MVTec AD texture's 512 px working
    image stays at 16 tiles without overlap.
    `texture_fov`: textures are brought to a working resolution whose short side is
    size / texture_fov. Own folders (dataset "folder") never work above their images' own
    resolution: a 128 px photo is not upsampled to reach the MVTec AD scale.
    """
    pre = _row(dataset, category)
    kind = kind or pre.get("kind", "object")
    size = size or pre["size"]
    if tile_stride is None:
        tile_stride = max(1, int(round(pre["tile_step"] * size))) if "tile_step" in pre else AUTO_STRIDE
    if texture_fov is None:
        texture_fov = pre.get("texture_fov", 0.25 if kind == "texture" else 1.0)
    return Preprocess(kind=kind, size=size, texture_fov=texture_fov,
                      patches_per_epoch=pre.get("patches_per_epoch", 10000), tile_stride=tile_stride,
                      upsample=dataset != "folder")


def projection_config(dataset: str, category: str, likelihood: str | None = None, *,
                      size: int | None = None) -> ProjectionConfig:
    """The category's projection settings (T, step and hold, smoothing) for a model trained with
    `likelihood` (None: the preset's own), or those of that likelihood where the preset was
    calibrated for another one. step and hold are alpha and lam in the model's own units
    (`ProjectionConfig.step` / `hold`): the pipelines resolve them on the run's held-out normal
    images (`loss_scale.resolve`); alpha and lam are what they resolve to on the brick model they
    were chosen with. `size`: the run's model input size (None: the preset's); the map's smoothing
    is stated at the preset's size and keeps its share of the input at any other (1 px at 64 px,
    2 px at 128 px; docs/method.md, Anomaly maps), so a run trained with `--size` is smoothed as
    the calibration intended. Its `model` is the default ModelConfig: projecting a run sets it to
    the run's model."""
    pre = _row(dataset, category)
    scale = {k: pre[k] for k in ("alpha", "lam", "step", "hold")}
    if likelihood is not None and likelihood != pre["likelihood"]:
        scale.update(LIKELIHOOD_PROJECTION.get(likelihood, {}))
    sigma = pre["smoothing_sigma"] * (size or pre["size"]) / pre["size"]
    return ProjectionConfig(steps=pre["proj_steps"], smoothing_sigma=sigma, **scale)
