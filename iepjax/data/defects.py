"""Synthetic surface defects drawn on texture crops (numpy, plus scipy.ndimage filters).

Two families:

* defects that *add* structure (:data:`STRUCTURE_KINDS`): ``scratch``, ``spot``, ``stain``,
  ``foreign``;
* defects that *remove* detail (:data:`DETAIL_LOSS_KINDS`): ``blur``, ``smooth``,
  ``lost_texture``. They keep the region's opacity-weighted mean (per channel) exactly, before
  clipping and quantisation, so that a map of intensity differences alone cannot see them; what
  changes is the local variance of the texture.

Every defect function has the signature ``fn(image, rng) -> (defected, mask)``:

* ``image``: float32 array ``(H, W)`` or ``(H, W, C)`` with values in [0, 1];
* ``rng``: a ``numpy.random.Generator`` (the only source of randomness);
* ``defected``: same shape/dtype as ``image``; pixels outside ``mask`` are
  bit-identical to ``image``;
* ``mask``: bool ``(H, W)``, True where the defect changed the image.

Each defect is drawn as a soft opacity map ``alpha`` (anti-aliased, soft edge)
and a per-pixel ``target`` appearance.  The mask is ``alpha > MASK_THRESHOLD``
and the opacity actually used is ``alpha`` rescaled from
``[MASK_THRESHOLD, 1]`` to ``[0, 1]``, so the blend fades smoothly to exactly
zero at the mask border and nothing outside the mask is touched.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

MASK_THRESHOLD = 0.25

# Parameter ranges (fractions of the full [0, 1] intensity range unless noted).
SCRATCH_WIDTH_PX = (1.0, 2.0)
SCRATCH_CONTRAST = (0.10, 0.25)
SCRATCH_LENGTH_PX = (24.0, 60.0)
SPOT_RADIUS_PX = (2.0, 5.0)
SPOT_CONTRAST = (0.12, 0.25)
STAIN_RADIUS_PX = (6.0, 14.0)
STAIN_DARKENING = (0.10, 0.20)
FOREIGN_SIZE_PX = (12, 24)
FOREIGN_STD_RATIO = (0.7, 1.1)
BLUR_RADIUS_PX = (7.0, 14.0)
BLUR_SIGMA_PX = (1.2, 2.5)
SMOOTH_RADIUS_PX = (7.0, 14.0)
SMOOTH_MEAN_SIGMA_PX = (4.0, 6.0)  # scale of the local mean the texture is flattened toward
SMOOTH_KEEP = (0.15, 0.4)  # fraction of the texture's deviation from that mean that is kept
LOST_RADIUS_PX = (5.0, 10.0)

DefectFn = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


# --------------------------------------------------------------------------- helpers


def _to_hwc(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """Return a float32 (H, W, C) view of `image` and whether it was 2-D."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        return image[:, :, None], True
    if image.ndim == 3:
        return image, False
    raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {image.shape}")


def _composite(
    image: np.ndarray, alpha: np.ndarray, target: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Blend `target` over `image` (H, W, C) with opacity `alpha` (H, W); exact outside the mask."""
    mask = alpha > MASK_THRESHOLD
    a = np.clip((alpha - MASK_THRESHOLD) / (1.0 - MASK_THRESHOLD), 0.0, 1.0)[..., None]
    blended = np.clip(image + a * (target - image), 0.0, 1.0).astype(np.float32)
    return np.where(mask[..., None], blended, image), mask


def _finish(
    image: np.ndarray, alpha: np.ndarray, target: np.ndarray, squeeze: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Composite and restore the caller's (H, W) layout if needed."""
    out, mask = _composite(image, alpha.astype(np.float32), target.astype(np.float32))
    return (out[:, :, 0] if squeeze else out), mask


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (yy, xx), float32."""
    yy, xx = np.mgrid[0:h, 0:w]
    return yy.astype(np.float32), xx.astype(np.float32)


def _center(rng: np.random.Generator, h: int, w: int, margin: float) -> tuple[float, float]:
    """Random point at least `margin` px from the border (clamped for tiny images)."""
    my, mx = min(margin, (h - 1) / 2), min(margin, (w - 1) / 2)
    return float(rng.uniform(my, h - 1 - my)), float(rng.uniform(mx, w - 1 - mx))


def _smoothstep(t: np.ndarray) -> np.ndarray:
    """Cubic smoothstep of t clipped to [0, 1]."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _blob_alpha(
    rng: np.random.Generator,
    h: int,
    w: int,
    cy: float,
    cx: float,
    radius: float,
    wobble: float,
    edge: float,
) -> np.ndarray:
    """Soft irregular blob: polar radius with random low harmonics, smooth edge of width `edge`."""
    yy, xx = _grid(h, w)
    dy, dx = yy - cy, xx - cx
    dist = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx)
    r_theta = np.ones_like(theta)
    for k in (2, 3, 4, 5):
        r_theta += rng.uniform(0.0, wobble) / (k - 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r_theta *= radius
    return _smoothstep((r_theta - dist) / edge + 0.5)


def _chaikin(points: np.ndarray, iterations: int = 2) -> np.ndarray:
    """Chaikin corner cutting: a smooth curve through the polyline's shape (end points kept)."""
    for _ in range(iterations):
        p, q = points[:-1], points[1:]
        inner = np.stack([0.75 * p + 0.25 * q, 0.25 * p + 0.75 * q], axis=1).reshape(-1, 2)
        points = np.concatenate([points[:1], inner, points[-1:]], axis=0)
    return points


def _distance_to_polyline(h: int, w: int, points: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel centre to the polyline through `points` (N, 2) as (y, x)."""
    yy, xx = _grid(h, w)
    pix = np.stack([yy, xx], axis=-1)[:, :, None, :]  # (H, W, 1, 2)
    a, b = points[:-1].astype(np.float32), points[1:].astype(np.float32)  # (S, 2)
    ab = b - a
    denom = np.maximum((ab**2).sum(-1), 1e-12)
    t = np.clip(((pix - a) * ab).sum(-1) / denom, 0.0, 1.0)  # (H, W, S)
    closest = a + t[..., None] * ab
    return np.sqrt(((pix - closest) ** 2).sum(-1)).min(-1)


@functools.lru_cache(maxsize=1)
def _camera() -> np.ndarray:
    """skimage.data.camera() as float32 in [0, 1] (default source of foreign texture)."""
    import skimage.data

    return skimage.data.camera().astype(np.float32) / 255.0


# --------------------------------------------------------------------------- defects


def scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Thin (1-2 px) anti-aliased curved stroke, 10-25 % darker or lighter."""
    img, squeeze = _to_hwc(image)
    h, w, _ = img.shape
    length = rng.uniform(*SCRATCH_LENGTH_PX)
    n_seg = int(rng.integers(3, 6))
    step = length / n_seg
    heading = rng.uniform(0, 2 * np.pi)
    turn = rng.uniform(-0.35, 0.35)  # consistent bend -> a gentle arc
    pts = [np.zeros(2)]
    for _ in range(n_seg):
        heading += turn + rng.normal(0.0, 0.2)
        pts.append(pts[-1] + step * np.array([np.sin(heading), np.cos(heading)]))
    pts = np.asarray(pts)
    pts -= (pts.min(0) + pts.max(0)) / 2  # centre the bounding box on the origin
    half_extent = np.abs(pts).max(0)
    cy = rng.uniform(min(half_extent[0] + 2, h / 2), max(h - 1 - half_extent[0] - 2, h / 2))
    cx = rng.uniform(min(half_extent[1] + 2, w / 2), max(w - 1 - half_extent[1] - 2, w / 2))
    pts = _chaikin(pts + np.array([cy, cx]), iterations=3)
    width = rng.uniform(*SCRATCH_WIDTH_PX)
    dist = _distance_to_polyline(h, w, pts)
    alpha = np.clip(width / 2 + 0.5 - dist, 0.0, 1.0)  # box-filter coverage of the stroke
    # Slow variation of the stroke strength along its length (real scratches are uneven).
    yy, xx = _grid(h, w)
    phase = rng.uniform(0, 2 * np.pi)
    along = (yy - cy) * np.sin(heading) + (xx - cx) * np.cos(heading)
    alpha *= 0.85 + 0.15 * np.cos(along / max(length, 1.0) * 2 * np.pi + phase)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    target = img + sign * rng.uniform(*SCRATCH_CONTRAST)
    return _finish(img, alpha, target, squeeze)


def spot(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Small soft-edged disc (radius 2-5 px), 12-25 % darker or brighter, texture half kept."""
    img, squeeze = _to_hwc(image)
    h, w, _ = img.shape
    radius = rng.uniform(*SPOT_RADIUS_PX)
    cy, cx = _center(rng, h, w, radius + 3)
    yy, xx = _grid(h, w)
    dist = np.hypot(yy - cy, xx - cx)
    alpha = _smoothstep((radius - dist) / 2.0 + 0.5)  # ~2 px soft edge
    local = img[alpha > MASK_THRESHOLD].mean(0) if (alpha > MASK_THRESHOLD).any() else img.mean((0, 1))
    sign = 1.0 if rng.random() < 0.5 else -1.0
    # Half the texture is replaced by the flat local mean, then shifted.
    target = 0.5 * img + 0.5 * local + sign * rng.uniform(*SPOT_CONTRAST)
    return _finish(img, alpha, target, squeeze)


def stain(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Irregular smooth blob (radius 6-14 px), multiplicative 10-20 % darkening / discoloration."""
    img, squeeze = _to_hwc(image)
    h, w, c = img.shape
    radius = rng.uniform(*STAIN_RADIUS_PX)
    cy, cx = _center(rng, h, w, radius * 1.3 + 3)
    alpha = _blob_alpha(rng, h, w, cy, cx, radius, wobble=0.25, edge=4.0)
    strength = rng.uniform(*STAIN_DARKENING)
    # Per-channel factors differ a little -> a discoloration on colour images.
    per_channel = strength * (1.0 + (rng.uniform(-0.3, 0.3, size=c) if c > 1 else np.zeros(c)))
    target = img * (1.0 - per_channel.astype(np.float32))
    return _finish(img, alpha, target, squeeze)


def foreign(
    image: np.ndarray, rng: np.random.Generator, source: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Patch (12-24 px) of another texture (default skimage camera()), mean-matched, soft-blended."""
    img, squeeze = _to_hwc(image)
    h, w, c = img.shape
    src = _camera() if source is None else np.asarray(source, dtype=np.float32)
    src, _ = _to_hwc(src)
    size = int(rng.integers(FOREIGN_SIZE_PX[0], FOREIGN_SIZE_PX[1] + 1))
    cy, cx = _center(rng, h, w, size / 2 + 3)
    alpha = _blob_alpha(rng, h, w, cy, cx, size / 2, wobble=0.15, edge=2.5)
    region = alpha > MASK_THRESHOLD
    # Choose a textured (non-flat) window of the source.
    patch = None
    for _ in range(50):
        y0 = int(rng.integers(0, src.shape[0] - h + 1)) if src.shape[0] > h else 0
        x0 = int(rng.integers(0, src.shape[1] - w + 1)) if src.shape[1] > w else 0
        cand = src[y0 : y0 + h, x0 : x0 + w]
        cand = np.rot90(cand, k=int(rng.integers(0, 4)))
        if cand.shape[:2] != (h, w):
            continue
        if cand[region].std() > 0.06:
            patch = cand
            break
    if patch is None:
        patch = cand
    if patch.shape[2] != c:
        patch = np.repeat(patch.mean(2, keepdims=True), c, axis=2)
    # Match the local mean (per channel) and scale the contrast to the local texture's.
    local_mean = img[region].mean(0)
    local_std = max(float(img[region].std()), 0.05)
    p_mean = patch[region].mean(0)
    p_std = max(float(patch[region].std()), 1e-3)
    ratio = rng.uniform(*FOREIGN_STD_RATIO)
    target = (patch - p_mean) / p_std * (local_std * ratio) + local_mean
    return _finish(img, alpha, target, squeeze)


def _opacity(alpha: np.ndarray) -> np.ndarray:
    """The opacity `_composite` blends with: `alpha` rescaled from [MASK_THRESHOLD, 1] to [0, 1]."""
    return np.clip((alpha - MASK_THRESHOLD) / (1.0 - MASK_THRESHOLD), 0.0, 1.0)


def _mean_matched(img: np.ndarray, alpha: np.ndarray, filtered: np.ndarray) -> np.ndarray:
    """`filtered` (H, W, C) shifted per channel so its opacity-weighted mean equals `img`'s."""
    a = _opacity(alpha)[..., None]
    total = max(float(a.sum()), 1e-12)
    shift = ((a * img).sum((0, 1)) - (a * filtered).sum((0, 1))) / total
    return filtered + shift.astype(np.float32)


def _detail_loss_alpha(rng: np.random.Generator, h: int, w: int, radius_px) -> np.ndarray:
    """Soft irregular blob (as for `stain`) that a detail-loss defect is drawn in."""
    radius = rng.uniform(*radius_px)
    cy, cx = _center(rng, h, w, radius * 1.3 + 3)
    return _blob_alpha(rng, h, w, cy, cx, radius, wobble=0.25, edge=4.0).astype(np.float32)


def blur(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Soft blob (radius 7-14 px) Gaussian-blurred (sigma 1.2-2.5 px), mean kept: a defocused or smeared spot."""
    from scipy import ndimage

    img, squeeze = _to_hwc(image)
    h, w, _ = img.shape
    alpha = _detail_loss_alpha(rng, h, w, BLUR_RADIUS_PX)
    sigma = rng.uniform(*BLUR_SIGMA_PX)
    blurred = ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0.0), mode="reflect")
    return _finish(img, alpha, _mean_matched(img, alpha, blurred), squeeze)


def smooth(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Soft blob (radius 7-14 px) whose texture keeps 15-40 % of its contrast around the local mean: a worn patch."""
    from scipy import ndimage

    img, squeeze = _to_hwc(image)
    h, w, _ = img.shape
    alpha = _detail_loss_alpha(rng, h, w, SMOOTH_RADIUS_PX)
    sigma = rng.uniform(*SMOOTH_MEAN_SIGMA_PX)
    keep = np.float32(rng.uniform(*SMOOTH_KEEP))
    # Unlike `blur`, which removes the finest detail and keeps the rest, every scale below
    # ~sigma is flattened by the same factor: a faint copy of the texture stays.
    local_mean = ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0.0), mode="reflect")
    target = _mean_matched(img, alpha, local_mean + keep * (img - local_mean))
    return _finish(img, alpha, target, squeeze)


def lost_texture(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Soft blob (radius 5-10 px) whose texture is replaced by its best-fit linear ramp: a patch of missing texture."""
    img, squeeze = _to_hwc(image)
    h, w, _ = img.shape
    alpha = _detail_loss_alpha(rng, h, w, LOST_RADIUS_PX)
    if not (alpha > MASK_THRESHOLD).any():  # image too small for the blob: nothing drawn
        return _finish(img, alpha, img, squeeze)
    # Weighted least squares plane a + b*y + c*x per channel, weights = the blend's opacity: the
    # ramp keeps the region's weighted mean (the intercept's normal equation) and its shading.
    a = _opacity(alpha).astype(np.float64)
    yy, xx = _grid(h, w)
    sel = a > 0
    cy, cx = float((a * yy).sum() / a.sum()), float((a * xx).sum() / a.sum())
    design = np.stack([np.ones(int(sel.sum())), yy[sel] - cy, xx[sel] - cx], axis=1)
    sw = np.sqrt(a[sel])[:, None]
    coef, *_ = np.linalg.lstsq(design * sw, img[sel].astype(np.float64) * sw, rcond=None)  # (3, C)
    full = np.stack([np.ones_like(yy), yy - cy, xx - cx], axis=-1).astype(np.float64)  # (H, W, 3)
    ramp = (full @ coef).astype(np.float32)  # (H, W, C)
    return _finish(img, alpha, ramp, squeeze)


# --------------------------------------------------------------------------- registry


class UnknownDefectError(KeyError, ValueError):
    """Raised for a defect kind that is not in the registry."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


class _Registry(dict):
    """dict of defect kinds whose missing-key error lists the valid kinds."""

    def __missing__(self, kind):
        raise UnknownDefectError(
            f"unknown defect kind {kind!r}; valid kinds: {', '.join(sorted(self))}"
        )


DEFECTS: dict[str, DefectFn] = _Registry(
    scratch=scratch,
    spot=spot,
    stain=stain,
    foreign=foreign,
    blur=blur,
    smooth=smooth,
    lost_texture=lost_texture,
)
DEFECT_KINDS: tuple[str, ...] = tuple(DEFECTS)  # every kind
STRUCTURE_KINDS: tuple[str, ...] = ("scratch", "spot", "stain", "foreign")  # add structure
DETAIL_LOSS_KINDS: tuple[str, ...] = ("blur", "smooth", "lost_texture")  # remove detail


def apply_defect(
    kind: str, image: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a defect of `kind` on `image`; raises UnknownDefectError for an unknown kind."""
    return DEFECTS[kind](image, rng)


def draw_visible(
    kind: str, clean: np.ndarray, rng: np.random.Generator, tries: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a defect of `kind` on a uint8 (H, W, C) crop so that it survives quantisation.

    Returns (uint8 image, bool mask (H, W)): pixels outside the mask are bit-identical to
    `clean`, and more than half of the mask's pixels differ from it after rounding to uint8.
    Redraws from `rng` (deterministically) up to `tries` times; raises RuntimeError if no draw
    is visible (a crop too small or too flat for the kind).
    """
    clean = np.asarray(clean, dtype=np.uint8)
    x = clean.astype(np.float32) / 255.0
    for _ in range(tries):
        out, m = apply_defect(kind, x, rng)
        q = np.rint(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8).reshape(clean.shape)
        q = np.where(m[..., None], q, clean)
        if m.sum() >= 4 and (q != clean)[m].mean() > 0.5:
            return q, m
    raise RuntimeError(f"could not draw a visible {kind} on a {clean.shape} crop in {tries} tries")
