"""Frozen, hashable configuration dataclasses (usable as static `jit` arguments); no package imports."""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Literal

Likelihood = Literal["bce", "gaussian", "l2", "ssim"]
Decoder = Literal["upsample", "transposed"]
Gradient = Literal["full", "detached"]

LIKELIHOODS: tuple[str, ...] = ("bce", "gaussian", "l2", "ssim")
DECODERS: tuple[str, ...] = ("upsample", "transposed")
GRADIENTS: tuple[str, ...] = ("full", "detached")

# The paper's three models (docs/method.md, Models): the name of each, the loss that makes it, and
# whether it is a VAE. The AEs' losses are not likelihoods of a VAE: their models are deterministic.
MODELS: tuple[str, ...] = ("vae", "ae_l2", "ae_ssim")
AE_LOSSES: dict[str, str] = {"ae_l2": "l2", "ae_ssim": "ssim"}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid: choose one of {', '.join(choices)}")


SIZE_RULE = "must be a multiple of 16, at least 32"  # the encoder halves the size four times


def size_ok(size: int) -> bool:
    """Whether `size` is a valid model input size (SIZE_RULE): ModelConfig and the scripts' --size."""
    return size % 16 == 0 and size >= 32


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The convolutional VAE of Bergmann et al. 2018 as used by the method (docs/method.md, Training).

    Attributes:
      size: input height = width in pixels, a multiple of 16 (128 in the paper).
      channels: 1 (gray) or 3 (RGB).
      latent: latent dimension (100 in the paper).
      decoder: "upsample" (nearest upsampling + 3x3 convs, the public port) or
        "transposed" (transposed convs, Bergmann et al. 2018).
      likelihood: reconstruction term L_r: "bce" (Bernoulli, summed binary cross-entropy, the
        public port's) or "gaussian" (Gaussian decoder with one learned variance gamma^2,
        Dai & Wipf 2019) for the VAE; "l2" (summed squared error) or "ssim" (summed 1 - SSIM
        map, Bergmann et al. 2018) make the model a deterministic autoencoder (`model_name`
        "ae_l2" / "ae_ssim"), which needs use_kl False.
      use_kl: whether the model's loss includes KL(q(z|x) || N(0, I)) (a VAE); False gives a
        deterministic AE on the posterior mean.
    """

    size: int = 128
    channels: int = 3
    latent: int = 100
    decoder: Decoder = "upsample"
    likelihood: Likelihood = "bce"
    use_kl: bool = True

    def __post_init__(self) -> None:
        if not size_ok(self.size):
            raise ValueError(f"ModelConfig.size={self.size}: {SIZE_RULE}")
        if self.channels not in (1, 3):
            raise ValueError(f"ModelConfig.channels={self.channels}: must be 1 (gray) or 3 (RGB)")
        _check_choice("ModelConfig.decoder", self.decoder, DECODERS)
        _check_choice("ModelConfig.likelihood", self.likelihood, LIKELIHOODS)
        if self.likelihood in AE_LOSSES.values() and self.use_kl:
            raise ValueError(f"ModelConfig.likelihood={self.likelihood!r} is a deterministic autoencoder's loss: "
                             "it needs use_kl=False (`model_config` builds it)")

    @property
    def model_name(self) -> str:
        """"vae", "ae_l2" or "ae_ssim": the paper's name of the model (its run folder results/<model_name>/)."""
        return {loss: name for name, loss in AE_LOSSES.items()}.get(self.likelihood, "vae")

    @property
    def deterministic(self) -> bool:
        """True for the AEs: no posterior variance, no sampling, no KL (the VAE's logvar head is absent)."""
        return self.likelihood in AE_LOSSES.values()


def model_config(model: str, base: ModelConfig = ModelConfig()) -> ModelConfig:
    """The ModelConfig of the paper's `model` ("vae", "ae_l2" or "ae_ssim") with `base`'s architecture.

    "vae" returns `base` unchanged (its likelihood and KL as given); an AE gets its loss and no KL.
    """
    _check_choice("model", model, MODELS)
    if model == "vae":
        return base
    return dataclasses.replace(base, likelihood=AE_LOSSES[model], use_kl=False)


@dataclasses.dataclass(frozen=True)
class ProjectionConfig:
    """Settings of the iterative energy-based projection (docs/method.md, Projection).

    E(x) = L_r(x) + lam * ||x - x0||_1;  x <- clip(x - alpha * dE/dx * (x - f(x))^2, 0, 1).

    Attributes:
      model: the architecture of the trained model whose loss is the energy.
      steps: T, number of gradient steps.
      alpha: step size. Its scale depends on the likelihood and the 'sum' reduction of L_r: the
        defaults (T 100, alpha 0.02, lam 15, sigma 1) are those calibrated for the Gaussian
        likelihood on the built-in textures (docs/calibration.md); BCE models want ~0.5
        (`presets.projection_preset` gives a BCE run the ports' alpha 0.5 and lam 0.05).
      lam: weight of the L1 proximity prior ||x - x0||_1. Like alpha, its scale follows the
        likelihood: with the Gaussian 'sum' loss dL_r/dx = (x - f) / gamma^2, so a pixel leaves x0
        only where |x - f| > lam * gamma^2 (~0.015 for lam 15 on brick, gamma^2 ~ 1e-3); the
        ports' 0.05 (BCE) is negligible there.
      weighting: multiply the gradient by (x - f(x))^2 (the paper); False = plain gradient step
        (the paper's ablation).
      use_kl: include the KL term in L_r during projection (only meaningful for a VAE).
      gradient: "full" (the paper): grad_x E flows through the encoder and the decoder, f depends
        on x; "detached" (the public ports): the network's outputs f(x) (and the posterior) are
        held constant while differentiating, so grad_x L_r is the loss's derivative in its first
        argument only (an ablation; docs/method.md, Projection).
      smoothing_sigma: std of the Gaussian smoothing of the anomaly map in pixels (0 = none).
      backtrack: a safeguard, not in the paper: when an image's energy rose at a step (E(x_t) >
        E(x_{t-1}): the step was too long), x_t is discarded and the step from x_{t-1} retaken
        with half that image's alpha. Steps that lower the energy are the paper's update
        unchanged, so while E falls the result is the same; without it a too-large alpha lets
        an image run away to noise (seen on 1 of 192 brick tiles at the default alpha).
      step, hold: alpha and lam in units of the trained model's own loss (docs/method.md,
        Projection: scales), resolved into alpha and lam on a run's held-out normal images by
        `loss_scale.resolve`, which then clears them: `step`, the first step in intensity units
        of a normal pixel with a typical gradient and weighting; `hold`, the fraction of normal
        pixels the prior keeps at x0 at the first step. None: alpha (lam) as given. The presets
        give both, so that one default means the same for every model and dataset; the
        projection itself takes only resolved configs (`resolved`).
      stop_loss: early stopping (docs/method.md, Projection: a public port stops once L_r falls
        below the smallest training loss): from the first step at which an image's
        L_r(x_t) <= stop_loss, that image stops moving, so x_T = x_t. None = never stop (T steps).
        `early_stop.with_early_stop` sets it to the smallest L_r of the run's held-out normal
        images, the scripts' default.
    """

    model: ModelConfig = ModelConfig()
    steps: int = 100
    alpha: float = 0.02
    lam: float = 15.0
    weighting: bool = True
    use_kl: bool = True
    smoothing_sigma: float = 1.0
    backtrack: bool = True
    stop_loss: float | None = None
    gradient: Gradient = "full"
    step: float | None = None
    hold: float | None = None

    @property
    def resolved(self) -> bool:
        """Whether alpha and lam are final (no `step` / `hold` left to resolve on normal images)."""
        return self.step is None and self.hold is None

    def __post_init__(self) -> None:
        _check_choice("ProjectionConfig.gradient", self.gradient, GRADIENTS)
        if self.step is not None and not (self.step > 0 and math.isfinite(self.step)):
            raise ValueError(f"ProjectionConfig.step={self.step}: must be > 0 (or None: alpha as given)")
        if self.hold is not None and not 0.0 <= self.hold < 1.0:
            raise ValueError(f"ProjectionConfig.hold={self.hold}: a fraction in [0, 1) (or None: lam as given)")
        if self.steps < 0:
            raise ValueError(f"ProjectionConfig.steps={self.steps}: must be >= 0")
        # alpha, lam and stop_loss are checked as numbers; inside a compiled program (`join_traced`)
        # they are traced scalars, already checked when the caller's config was made.
        if any(_is_number(v) and v < 0 for v in (self.alpha, self.lam, self.smoothing_sigma)):
            raise ValueError("ProjectionConfig: alpha, lam and smoothing_sigma must be >= 0")
        if _is_number(self.stop_loss) and not math.isfinite(self.stop_loss):
            raise ValueError(f"ProjectionConfig.stop_loss={self.stop_loss}: a finite loss, or None for no early stop")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real)


# ProjectionConfig's numeric settings that a compiled program takes as traced scalars instead of
# compiling them in: one program per shape and structure serves every alpha, lam and stop_loss
# (the values the scripts resolve per run). Whether stop_loss is None stays structural.
TRACED_FIELDS: tuple[str, ...] = ("alpha", "lam", "stop_loss")


def split_traced(config: ProjectionConfig) -> tuple[ProjectionConfig, dict[str, float]]:
    """(compile key, values): `config` with its TRACED_FIELDS that are set (alpha, lam, a stop_loss
    that is not None) replaced by the placeholder 0.0, and their values as floats. Pass the key as
    the jitted function's static argument and the values as a traced one; `join_traced` undoes it."""
    values = {f: float(getattr(config, f)) for f in TRACED_FIELDS if getattr(config, f) is not None}
    return dataclasses.replace(config, **dict.fromkeys(values, 0.0)), values


def join_traced(key: ProjectionConfig, values: dict) -> ProjectionConfig:
    """The config `split_traced` split: `key` with `values` (inside a compiled program, tracers) put back."""
    return dataclasses.replace(key, **values)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of VAE training (docs/method.md, Training).

    Attributes:
      model: architecture and loss.
      steps: optimiser steps.
      batch_size: images per step.
      learning_rate, b1, b2: Adam (the paper: 2e-4, 0.5, 0.999).
      seed: seed of every PRNG key (parameters, sampling, augmentation).
      augment: random flips and 90-degree rotations (textures).
      free_bits: a floor, in nats, on each latent dimension's KL term of an image
        (`losses.kl_free_bits`; 0 = the plain KL): below it the encoder is not pushed towards the
        prior, a remedy for posterior collapse (docs/method.md, Training).
      kl_warmup: steps over which the KL term's weight rises linearly from 0 to 1 (0 = weight 1
        from the first step): the model first learns to reconstruct, then to match the prior.
      checkpoint_every: save an orbax checkpoint every this many steps (and at the end).
      log_every: write a row of the training log every this many steps.
    """

    model: ModelConfig = ModelConfig()
    steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 2e-4
    b1: float = 0.5
    b2: float = 0.999
    seed: int = 0
    augment: bool = True
    free_bits: float = 0.0
    kl_warmup: int = 0
    checkpoint_every: int = 500
    log_every: int = 25

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("TrainConfig: steps and batch_size must be >= 1")
        if not (self.free_bits >= 0 and math.isfinite(self.free_bits)) or self.kl_warmup < 0:
            raise ValueError(f"TrainConfig: free_bits ({self.free_bits}) and kl_warmup ({self.kl_warmup}) must be >= 0")


MAP_KINDS: tuple[str, ...] = ("paper", "nce")
IMAGE_SCORES: tuple[str, ...] = ("max", "topk", "smoothed_max", "area")


@dataclasses.dataclass(frozen=True)
class MapConfig:
    """Which anomaly map and image score are scored and thresholded (docs/method.md, Anomaly maps
    and Normal-calibrated maps; `iepjax.calibrated_maps`).

    Attributes:
      kind: "paper" (the residual map Gaussian-smoothed by `ProjectionConfig.smoothing_sigma`) or
        "nce" (the raw residual map calibrated on the run's held-out normal images: -log10 of the
        two-sided tail probability of its local energy in a context bin).
      image_score: "max" (the paper's), "topk" (mean of the top `topk_frac` of the pixels),
        "smoothed_max" (max after a Gaussian of std `smoothed_max_sigma` px), "area" (fraction
        of the pixels at or above the pixel threshold). The defaults, chosen on the calibration
        splits (docs/calibration.md, Anomaly map and image score), are `default_map`'s: the paper's
        map scored by the mean of its top 0.1 % pixels.
      window_sigma: nce, px: std of the Gaussian window of the local energy.
      feature_sigma: nce, px: scale of the local standard deviation of x0 (the context).
      feature_bins: nce: quantile bins of that local standard deviation.
      border_bands: nce: band edges in px from the image border (d < e1 | e1 <= d < e2 | ...).
      border_reach: nce, px: distances from the border the border profile covers.
      eps_frac: nce: the log's floor, a fraction of the normal images' median local energy.
      tail_q: nce: empirical quantiles between tail_q and 1 - tail_q, exponential tails beyond.
      n_grid: nce: quantile grid points per context bin.
    """

    kind: str = "paper"
    image_score: str = "topk"
    topk_frac: float = 0.001
    smoothed_max_sigma: float = 4.0
    window_sigma: float = 2.0
    feature_sigma: float = 4.0
    feature_bins: int = 10
    border_bands: tuple[int, ...] = (1, 3, 8)
    border_reach: int = 16
    eps_frac: float = 1e-2
    tail_q: float = 1e-3
    n_grid: int = 201

    def __post_init__(self) -> None:
        _check_choice("MapConfig.kind", self.kind, MAP_KINDS)
        _check_choice("MapConfig.image_score", self.image_score, IMAGE_SCORES)
        object.__setattr__(self, "border_bands", tuple(int(b) for b in self.border_bands))
        if not 0 < self.topk_frac <= 1:
            raise ValueError(f"MapConfig.topk_frac={self.topk_frac}: a fraction in (0, 1]")
        if not 0 < self.tail_q < 0.5 or self.n_grid < 2 or self.feature_bins < 1 or self.border_reach < 1:
            raise ValueError("MapConfig: tail_q in (0, 0.5), n_grid >= 2, feature_bins >= 1, border_reach >= 1")
        if min(self.window_sigma, self.feature_sigma, self.smoothed_max_sigma, self.eps_frac) <= 0:
            raise ValueError("MapConfig: window_sigma, feature_sigma, smoothed_max_sigma and eps_frac must be > 0")
        if list(self.border_bands) != sorted(set(self.border_bands)) or any(b < 1 for b in self.border_bands):
            raise ValueError(f"MapConfig.border_bands={self.border_bands}: increasing edges >= 1")

    def score_record(self) -> dict:
        """The map kind and image score as recorded beside metrics and thresholds, with the image
        score's parameter (topk_frac or smoothed_max_sigma) where it has one."""
        param = {"topk": "topk_frac", "smoothed_max": "smoothed_max_sigma"}.get(self.image_score)
        return {"kind": self.kind, "image_score": self.image_score, **({param: getattr(self, param)} if param else {})}


# The image score of each map kind: the mean of its top fraction of pixels (docs/calibration.md).
DEFAULT_TOPK_FRAC = {"paper": 0.001, "nce": 0.005}


def default_map(kind: str = "paper") -> MapConfig:
    """The map `kind` ("paper" or "nce") with its default image score, the mean of the map's top
    `DEFAULT_TOPK_FRAC[kind]` of the pixels (chosen on the calibration splits: docs/calibration.md,
    Anomaly map and image score)."""
    _check_choice("map kind", kind, MAP_KINDS)
    return MapConfig(kind=kind, image_score="topk", topk_frac=DEFAULT_TOPK_FRAC[kind])


@dataclasses.dataclass(frozen=True)
class ThresholdConfig:
    """What a run's held-out normal training images decide (docs/method.md, Thresholds).

    Attributes:
      holdout: fraction of the normal training images kept out of training for this.
      pixel_quantile, image_quantile: the thresholds are these quantiles of the held-out images'
        pixel scores and image scores (`map`'s), so about (1 - q) of normal pixels /
        images are flagged.
      pixel_threshold, image_threshold: thresholds given by the user instead (None: fitted).
      early_stop: stop each image's projection once its L_r is as low as the lowest of the
        held-out images' (sets `ProjectionConfig.stop_loss`; docs/method.md, Projection).
      map: the anomaly map and image score the thresholds apply to (`MapConfig`); the "nce"
        map is itself fitted on the same held-out images.
      normal_dir: a folder of normal images taken as the test images are (the line's good parts):
        the thresholds, and the "nce" map, are fitted on them instead of the held-out training
        images, which can differ from the test images (lighting, region; docs/method.md,
        Thresholds). The projection's alpha, lam and early stopping still come from the held-out
        images: they describe the model, not the line.
    """

    holdout: float = 0.1
    pixel_quantile: float = 0.995
    image_quantile: float = 0.99
    pixel_threshold: float | None = None
    image_threshold: float | None = None
    early_stop: bool = True
    map: MapConfig = MapConfig()
    normal_dir: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.holdout < 1:
            raise ValueError(f"ThresholdConfig.holdout={self.holdout}: a fraction in [0, 1)")
        for name in ("pixel_quantile", "image_quantile"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"ThresholdConfig.{name}={getattr(self, name)}: a quantile in (0, 1]")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where a category's images come from (docs/datasets.md).

    Attributes:
      dataset: "textures" (built in), "mvtec_ad" or "folder" (your own images, MVTec AD layout).
      category: e.g. "brick", "carpet", or any name for "folder".
      tfds_dir: where TFDS keeps the prepared data (None: $IEPJAX_DATA_DIR or ~/tensorflow_datasets).
      source_dir: the image folder ("folder") or the MVTec AD download ("mvtec_ad"); None for
        the built-in data, or once a category is prepared.
    """

    dataset: str = "textures"
    category: str = "brick"
    tfds_dir: str | None = None
    source_dir: str | None = None


def to_dict(config: Any) -> dict:
    """Config dataclass -> JSON-ready nested dict."""
    return dataclasses.asdict(config)


def from_dict(cls: type, data: dict) -> Any:
    """Nested dict (from `to_dict`) -> config dataclass of type `cls`; unknown keys are an error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        if name == "model" and isinstance(value, dict):
            value = from_dict(ModelConfig, value)
        if name == "map" and isinstance(value, dict):
            value = from_dict(MapConfig, value)
        kwargs[name] = value
    return cls(**kwargs)
