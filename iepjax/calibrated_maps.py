"""Normal-calibrated anomaly maps and image scores (docs/method.md, Normal-calibrated maps).

The "nce" map (normal-calibrated, two-sided local energy) turns a RAW residual map m of one
image (the grad map mean_c |x_T - x0| or the recon map mean_c |x0 - f(x0)|, not smoothed) into
-log10 of a tail probability under the run's held-out normal images:

1. border profile: m <- m / r(d), r(d) the normal maps' mean at distance d px from the image
   border relative to their mean beyond `border_reach` px;
2. local energy: t = log(G_w * m^2 + eps), G_w a Gaussian window of std `window_sigma`, eps =
   `eps_frac` x the normal images' median G_w * m^2;
3. context bin: (quantile bin of the local standard deviation of x0 at `feature_sigma` px) x
   (border band of d);
4. A = -log10(2 min(F(t), 1 - F(t))), F the normal images' empirical distribution function of t
   in that bin (quantiles between `tail_q` and 1 - `tail_q`, exponential tails beyond).

`fit_normal` fits every table on normal maps and images only: it takes no labels. `nce_map` and
`image_score` work on one image; `nce_maps` / `image_scores` loop over a split. Numpy and scipy
only; the tables are plain arrays (`to_json` / `from_json`).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import ndimage

from iepjax.config import MapConfig, ProjectionConfig

TABLES = ("border_profile", "feature_edges", "tail_qs", "tail_beta_lo", "tail_beta_hi")
MIN_BIN_PIXELS = 100  # a context bin with fewer normal pixels uses the pooled distribution


def projection_for(config: ProjectionConfig, cfg: MapConfig) -> ProjectionConfig:
    """The projection settings the map `cfg` needs: the nce map starts from RAW residual maps (its
    window smooths), so `smoothing_sigma` 0; the paper's map keeps `config`'s."""
    return dataclasses.replace(config, smoothing_sigma=0.0) if cfg.kind == "nce" else config


def gray(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) image, uint8 or float in [0, 1] -> (H, W) float64 channel mean in [0, 1]."""
    x = np.asarray(image)
    x = x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)
    return x.mean(-1) if x.ndim == 3 else x


def smooth(a_HxW: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of one (H, W) array, std `sigma` px, mirror padding at the border."""
    return ndimage.gaussian_filter(np.asarray(a_HxW, np.float64), sigma, mode="reflect")


def local_std(x_HxW: np.ndarray, sigma: float) -> np.ndarray:
    """Local standard deviation sqrt(G_s * x^2 - (G_s * x)^2) of one gray image (H, W): the context."""
    mu = smooth(x_HxW, sigma)
    return np.sqrt(np.maximum(smooth(x_HxW * x_HxW, sigma) - mu * mu, 0.0))


def border_distance(h: int, w: int) -> np.ndarray:
    """(H, W) int: each pixel's distance in px to the nearest image border (0 on the outermost ring)."""
    y, x = np.arange(h)[:, None], np.arange(w)[None, :]
    return np.minimum(np.minimum(y, h - 1 - y), np.minimum(x, w - 1 - x))


def _border_factor(profile: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """r(d) per pixel (1 beyond the profile's reach)."""
    d = border_distance(*shape)
    f = np.ones(shape)
    near = d < len(profile)
    f[near] = np.asarray(profile)[d[near]]
    return f


def _energy(m_HxW: np.ndarray, profile: np.ndarray, cfg: MapConfig) -> np.ndarray:
    """Steps 1-2 without the log: G_w * (m / r(d))^2."""
    mb = np.asarray(m_HxW, np.float64) / _border_factor(profile, np.shape(m_HxW))
    return smooth(mb * mb, cfg.window_sigma)


def _bins(x_HxW: np.ndarray, edges: np.ndarray, cfg: MapConfig) -> np.ndarray:
    """Step 3: (H, W) context bin index, feature bin x (len(border_bands) + 1) + border band."""
    fb = np.digitize(local_std(x_HxW, cfg.feature_sigma), edges)
    band = np.digitize(border_distance(*x_HxW.shape), np.asarray(cfg.border_bands))
    return fb * (len(cfg.border_bands) + 1) + band


def _fit_tail(t: np.ndarray, cfg: MapConfig) -> tuple[np.ndarray, float, float]:
    """Quantile grid of t between tail_q and 1 - tail_q, and the mean excess beyond each end (the
    exponential tails' scales)."""
    qs = np.quantile(t, np.linspace(cfg.tail_q, 1 - cfg.tail_q, cfg.n_grid))
    below, above = t[t < qs[0]], t[t > qs[-1]]
    lo = float(qs[0] - below.mean()) if below.size else 1e-6
    hi = float(above.mean() - qs[-1]) if above.size else 1e-6
    return qs, max(lo, 1e-6), max(hi, 1e-6)


def fit_normal(normal_maps: Sequence[np.ndarray], normal_images: Sequence[np.ndarray], cfg: MapConfig) -> dict:
    """Fit the nce map's tables on normal images only (docs/method.md, Normal-calibrated maps).

    Args:
      normal_maps: N raw residual maps (H_i, W_i) of the run's held-out normal images.
      normal_images: the same N images (H_i, W_i[, C]), uint8 or float in [0, 1].
      cfg: the map's settings (`MapConfig`).
    Returns:
      {"border_profile": (D,), "eps": float, "feature_edges": (feature_bins - 1,),
       "tail_qs": (B, n_grid), "tail_beta_lo": (B,), "tail_beta_hi": (B,)} with
      B = feature_bins x (len(border_bands) + 1).
    """
    ms = [np.asarray(m, np.float64) for m in normal_maps]
    xs = [gray(x) for x in normal_images]
    if not ms or len(ms) != len(xs) or any(m.shape != x.shape for m, x in zip(ms, xs)):
        raise ValueError("fit_normal: one (H, W) map per image, of the image's size, at least one")
    # 1. border profile r(d), d < reach, relative to the interior
    dists = [border_distance(*m.shape) for m in ms]
    reach = int(min(cfg.border_reach, min(int(d.max()) for d in dists)))
    inner = np.concatenate([m[d >= reach] for m, d in zip(ms, dists)]).mean()
    profile = np.array([np.concatenate([m[d == k] for m, d in zip(ms, dists)]).mean() for k in range(reach)])
    profile = profile / max(float(inner), 1e-12)
    profile = np.where(profile > 0, profile, 1.0)
    # 2. local energy and its floor
    es = [_energy(m, profile, cfg) for m in ms]
    eps = float(cfg.eps_frac * np.median(np.concatenate([e.ravel() for e in es])) + 1e-12)
    t = np.concatenate([np.log(e + eps).ravel() for e in es])
    # 3. context bins
    feat = np.concatenate([local_std(x, cfg.feature_sigma).ravel() for x in xs])
    edges = np.quantile(feat, np.linspace(0, 1, cfg.feature_bins + 1)[1:-1])
    b = np.concatenate([_bins(x, edges, cfg).ravel() for x in xs])
    # 4. per-bin empirical distribution with exponential tails
    qs, lo, hi = [], [], []
    for i in range(cfg.feature_bins * (len(cfg.border_bands) + 1)):
        ti = t[b == i]
        q, l, h = _fit_tail(ti if ti.size >= MIN_BIN_PIXELS else t, cfg)
        qs.append(q), lo.append(l), hi.append(h)
    return {"border_profile": profile, "eps": eps, "feature_edges": edges, "tail_qs": np.stack(qs),
            "tail_beta_lo": np.array(lo), "tail_beta_hi": np.array(hi)}


def _two_sided(t: np.ndarray, qs: np.ndarray, beta_lo: float, beta_hi: float, q: float) -> np.ndarray:
    """Step 4 in one bin: -log10(2 min(F(t), 1 - F(t)))."""
    probs = np.linspace(q, 1 - q, len(qs))
    xp = qs + np.arange(len(qs)) * 1e-12  # strictly increasing for np.interp (ties where a bin is flat)
    F = np.interp(t, xp, probs)
    S = 1.0 - F
    low, high = t < qs[0], t > qs[-1]
    F[low] = q * np.exp(-(qs[0] - t[low]) / beta_lo)
    S[high] = q * np.exp(-(t[high] - qs[-1]) / beta_hi)
    return -np.log10(np.clip(2.0 * np.minimum(F, S), 1e-300, 1.0))


def nce_map(fit: dict, m_HxW: np.ndarray, x0_HxWxC: np.ndarray, cfg: MapConfig) -> np.ndarray:
    """The nce map of one image: raw residual map (H, W) and its image (H, W[, C]) -> (H, W) float32,
    -log10 of the two-sided tail probability under the normal images (`fit_normal`'s tables).

    Scaling m and the fitted eps by one constant leaves it unchanged (only log m differences and
    quantiles of them enter)."""
    m, x = np.asarray(m_HxW, np.float64), gray(x0_HxWxC)
    if m.shape != x.shape:
        raise ValueError(f"nce_map: map {m.shape} and image {x.shape} differ in size")
    t = np.log(_energy(m, fit["border_profile"], cfg) + fit["eps"])
    b = _bins(x, np.asarray(fit["feature_edges"]), cfg)
    out = np.zeros(t.shape)
    for i in np.unique(b):
        sel = b == i
        out[sel] = _two_sided(t[sel], np.asarray(fit["tail_qs"][i]), float(fit["tail_beta_lo"][i]),
                              float(fit["tail_beta_hi"][i]), cfg.tail_q)
    return out.astype(np.float32)


def nce_maps(fit: dict, maps: Sequence[np.ndarray], images: Sequence[np.ndarray], cfg: MapConfig) -> list:
    """`nce_map` of each of N images: a list of (H_i, W_i) float32 maps."""
    return [nce_map(fit, m, x, cfg) for m, x in zip(maps, images)]


def image_score(map_HxW: np.ndarray, cfg: MapConfig, pixel_threshold: float | None = None) -> float:
    """Image anomaly score of one map (docs/method.md, Normal-calibrated maps, image scores):
    "max" (the paper's), "topk" (mean of the top `topk_frac` of the pixels, at least one),
    "smoothed_max" (max of G_s * map, s = `smoothed_max_sigma` px), "area" (fraction of the pixels
    at or above `pixel_threshold`)."""
    a = np.asarray(map_HxW, np.float64)
    if cfg.image_score == "max":
        return float(a.max())
    if cfg.image_score == "topk":
        k = max(1, int(round(a.size * cfg.topk_frac)))
        return float(np.partition(a.ravel(), a.size - k)[a.size - k:].mean())
    if cfg.image_score == "smoothed_max":
        return float(smooth(a, cfg.smoothed_max_sigma).max())
    if pixel_threshold is None:
        raise ValueError("the 'area' image score needs the pixel threshold")
    return float(np.mean(a >= pixel_threshold))


def image_scores(maps: Sequence[np.ndarray], cfg: MapConfig, pixel_threshold: float | None = None) -> np.ndarray:
    """`image_score` of each of N maps: (N,) float64."""
    return np.array([image_score(m, cfg, pixel_threshold) for m in maps], dtype=np.float64)


def to_json(fit: dict) -> dict:
    """The fitted tables as JSON-ready lists."""
    return {k: (np.asarray(v).tolist() if k in TABLES else float(v)) for k, v in fit.items()}


def from_json(stored: dict) -> dict:
    """`to_json`'s output back to arrays."""
    return {k: (np.asarray(v, np.float64) if k in TABLES else float(v)) for k, v in stored.items()}
