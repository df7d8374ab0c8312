"""Anomaly detection and localisation metrics (numpy / scikit-learn / scipy only).

Implements the evaluation protocol of Dehaene et al. (ICLR 2020) on MVTec AD:

* pixel AUROC: ROC AUC over all test pixels of a category pooled (good images included);
* image AUROC: ROC AUC of the image score ``max`` of the anomaly map;
* AU-PRO: normalised area under the per-region-overlap curve up to a false positive
  rate of 0.3 (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021).

Maps and masks are given either as one stacked ``N x H x W`` array or as a sequence of
``H_i x W_i`` arrays (images may differ in size). Masks may be bool or integer;
nonzero means anomalous.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import numpy as np
import numpy.typing as npt
from scipy import ndimage

ImageStack = Union[np.ndarray, Sequence[npt.ArrayLike]]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------- helpers


def _as_image_list(images: ImageStack, name: str) -> list[np.ndarray]:
    """Returns a list of 2-D arrays from an ``N x H x W`` array or a sequence of 2-D arrays."""
    if isinstance(images, np.ndarray):
        if images.ndim != 3:
            raise ValueError(f"{name}: expected an N x H x W array, got shape {images.shape}")
        out = list(images)
    else:
        out = [np.asarray(x) for x in images]
        for i, x in enumerate(out):
            if x.ndim != 2:
                raise ValueError(f"{name}[{i}]: expected a 2-D H x W array, got shape {x.shape}")
    if not out:
        raise ValueError(f"{name}: no images given")
    return out


def _paired_lists(maps: ImageStack, masks: ImageStack) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Validates maps against masks (count and per-image shape) and returns both as lists."""
    map_list = _as_image_list(maps, "maps")
    mask_list = _as_image_list(masks, "masks")
    if len(map_list) != len(mask_list):
        raise ValueError(f"got {len(map_list)} maps but {len(mask_list)} masks")
    for i, (m, g) in enumerate(zip(map_list, mask_list)):
        if m.shape != g.shape:
            raise ValueError(f"shape mismatch at index {i}: map {m.shape} vs mask {g.shape}")
    return map_list, mask_list


def _flat_scores(map_list: list[np.ndarray]) -> np.ndarray:
    """Concatenates flattened maps into one float vector; rejects NaN/inf."""
    scores = np.concatenate([m.ravel() for m in map_list])
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if not np.all(np.isfinite(scores)):
        raise ValueError("anomaly maps contain NaN or inf")
    return scores


def _flat_gt(mask_list: list[np.ndarray]) -> np.ndarray:
    """Concatenates flattened masks into one bool vector (nonzero = anomalous)."""
    return np.concatenate([g.ravel() != 0 for g in mask_list])


def _check_both_classes(gt: np.ndarray, what: str) -> None:
    n_pos = int(np.count_nonzero(gt))
    if n_pos == 0:
        raise ValueError(f"no anomalous {what}: the metric is undefined")
    if n_pos == gt.size:
        raise ValueError(f"no normal {what}: the metric is undefined")


# --------------------------------------------------------------------------- image level


def image_scores(maps: ImageStack) -> np.ndarray:
    """Image anomaly score = maximum of each anomaly map.

    Args:
        maps: ``N x H x W`` array or sequence of ``H_i x W_i`` arrays.

    Returns:
        ``(N,)`` float array, ``s_n = max_{i,j} A_n[i, j]``.
    """
    map_list = _as_image_list(maps, "maps")
    return np.array([float(np.max(m)) for m in map_list], dtype=np.float64)


def image_auroc(scores_N: npt.ArrayLike, labels_N: npt.ArrayLike) -> float:
    """Image-level ROC AUC (``sklearn.metrics.roc_auc_score``).

    Args:
        scores_N: ``(N,)`` image scores (higher = more anomalous).
        labels_N: ``(N,)`` labels, 0 good, nonzero anomalous.

    Returns:
        Area under the ROC curve, in [0, 1].
    """
    scores = np.asarray(scores_N, dtype=np.float64).ravel()
    labels = np.asarray(labels_N).ravel() != 0
    if scores.shape != labels.shape:
        raise ValueError(f"got {scores.size} scores but {labels.size} labels")
    if not np.all(np.isfinite(scores)):
        raise ValueError("image scores contain NaN or inf")
    _check_both_classes(labels, "images")
    from sklearn.metrics import roc_auc_score  # imported when used: scripts that score nothing start faster
    return float(roc_auc_score(labels, scores))


# --------------------------------------------------------------------------- pixel level


def pixel_auroc(maps: ImageStack, masks: ImageStack) -> float:
    """Pixel-level ROC AUC over all pixels of all images pooled.

    The metric of Dehaene et al. (2020): every pixel of every test image (good images
    included, their masks all zero) is one sample; ``sklearn.metrics.roc_auc_score``.

    Args:
        maps: ``N x H x W`` array or sequence of ``H_i x W_i`` anomaly maps.
        masks: same layout and shapes; nonzero = anomalous pixel.

    Returns:
        Area under the pooled pixel ROC curve, in [0, 1].
    """
    map_list, mask_list = _paired_lists(maps, masks)
    scores = _flat_scores(map_list)
    gt = _flat_gt(mask_list)
    _check_both_classes(gt, "pixels")
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(gt, scores))


def pro_curve(maps: ImageStack, masks: ImageStack) -> tuple[np.ndarray, np.ndarray]:
    """Per-region-overlap curve of Bergmann et al. (IJCV 2021), MVTec AD protocol.

    Ground-truth regions are the 8-connected components of each mask (``scipy.ndimage.label``
    with a 3x3 structure of ones). For each distinct score ``t`` (one global descending
    sort over all images):

        FPR(t) = #{normal pixels with A >= t} / #{normal pixels}
        PRO(t) = (1/R) sum_r #{p in region r : A(p) >= t} / |region r|

    Args:
        maps: ``N x H x W`` array or sequence of ``H_i x W_i`` anomaly maps.
        masks: same layout and shapes; nonzero = anomalous pixel.

    Returns:
        ``(fpr, pro)``: 1-D arrays of equal length ``K + 1`` (``K`` distinct scores), FPR
        non-decreasing, starting at ``(0, 0)`` (threshold above the maximum) and ending at
        ``(1, 1)`` (threshold at the minimum).
    """
    map_list, mask_list = _paired_lists(maps, masks)
    scores = _flat_scores(map_list)

    # Region id per pixel: 0 = normal, 1..R = 8-connected ground-truth region (global ids).
    region_ids = []
    offset = 0
    for g in mask_list:
        lab, n = ndimage.label(g != 0, structure=_EIGHT_CONNECTED)
        lab = lab.ravel()  # int32
        lab[lab > 0] += offset
        offset += n
        region_ids.append(lab)
    region_id = np.concatenate(region_ids)
    n_regions = offset
    n_anom = int(np.count_nonzero(region_id))
    n_normal = region_id.size - n_anom
    if n_regions == 0:
        raise ValueError("no anomalous pixels: the PRO curve is undefined")
    if n_normal == 0:
        raise ValueError("no normal pixels: the PRO curve is undefined")
    region_size = np.bincount(region_id, minlength=n_regions + 1)[1:]

    # One global sort of all scores (values only: np.sort is much faster than argsort). The
    # distinct values, in descending order, are the thresholds t, so tied scores give one
    # curve point. Pixels >= t: all of them from this sort, the anomalous ones from a
    # separate (small) sort of the anomalous pixels; normal = all - anomalous (exact counts).
    s_sorted = np.sort(scores)
    first = np.flatnonzero(np.concatenate(([True], s_sorted[1:] != s_sorted[:-1])))[::-1]
    thresholds = s_sorted[first]
    n_all_above = scores.size - first
    del s_sorted

    # Anomalous pixels, ascending by score, with PRO weights w = 1 / (|region| * R): the sum
    # of w over the pixels >= t is PRO(t).
    anom = np.flatnonzero(region_id)
    anom_order = np.argsort(scores[anom], kind="stable")
    anom_scores = scores[anom][anom_order]
    anom_region = region_id[anom][anom_order]
    weights = 1.0 / (region_size[anom_region - 1].astype(np.float64) * n_regions)
    w_above = np.concatenate((np.cumsum(weights[::-1])[::-1], [0.0]))  # w_above[i] = sum w[i:]
    idx = np.searchsorted(anom_scores, thresholds, side="left")  # first anomalous >= t
    n_anom_above = n_anom - idx

    fpr = (n_all_above - n_anom_above) / n_normal
    pro = np.clip(w_above[idx], 0.0, 1.0)
    pro[-1] = 1.0  # Lowest threshold: every pixel is above it (removes cumsum round-off).
    fpr = np.concatenate(([0.0], fpr))
    pro = np.concatenate(([0.0], pro))
    return fpr, pro


def _trapezoid_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under a curve with non-decreasing ``x`` on ``[x[0], x_max]``.

    The curve is linearly interpolated at exactly ``x_max`` from the last point with
    ``x <= x_max`` and the next one (as the official MVTec AD evaluation code does).
    """
    k = int(np.searchsorted(x, x_max, side="right"))  # number of points with x <= x_max
    xs, ys = x[:k], y[:k]
    area = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) * 0.5))
    if xs[-1] < x_max and k < x.size:
        x0, y0, x1, y1 = x[k - 1], y[k - 1], x[k], y[k]
        y_max = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += float((x_max - x0) * (y0 + y_max) * 0.5)
    return area


def pixel_aupro(maps: ImageStack, masks: ImageStack, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AU-PRO).

    ``AU-PRO = (1 / fpr_limit) * integral_0^{fpr_limit} PRO d FPR``, trapezoid rule on the
    curve of ``pro_curve``, interpolated at exactly ``fpr_limit`` (Bergmann et al., IJCV
    2021, Sec. 4.2; integration limit 0.3). A perfect map gives 1.0.

    Args:
        maps: ``N x H x W`` array or sequence of ``H_i x W_i`` anomaly maps.
        masks: same layout and shapes; nonzero = anomalous pixel.
        fpr_limit: upper integration limit on the FPR, in (0, 1].

    Returns:
        AU-PRO in [0, 1].
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(maps, masks)
    area = _trapezoid_up_to(fpr, pro, fpr_limit)
    return float(np.clip(area / fpr_limit, 0.0, 1.0))


def f1_at_threshold(
    scores: ImageStack | npt.ArrayLike,
    labels: ImageStack | npt.ArrayLike,
    threshold: float,
) -> float:
    """F1 score of the prediction ``score >= threshold`` (``sklearn.metrics.f1_score``).

    Works at image level (``(N,)`` scores and labels) or pixel level (maps and masks as an
    array of any shape, or sequences of arrays of different sizes, flattened and pooled).

    Args:
        scores: anomaly scores, higher = more anomalous.
        labels: ground truth with the same shape(s); nonzero = anomalous.
        threshold: decision threshold; predicted positive iff ``score >= threshold``.

    Returns:
        F1 = 2 TP / (2 TP + FP + FN), 0.0 when there is no positive at all.
    """
    if isinstance(scores, np.ndarray) or not isinstance(scores, Sequence):
        s_list, l_list = [np.asarray(scores)], [np.asarray(labels)]
    else:
        s_list = [np.asarray(x) for x in scores]
        l_list = [np.asarray(x) for x in labels]
    if len(s_list) != len(l_list):
        raise ValueError(f"got {len(s_list)} score arrays but {len(l_list)} label arrays")
    for i, (s, g) in enumerate(zip(s_list, l_list)):
        if s.shape != g.shape:
            raise ValueError(f"shape mismatch at index {i}: scores {s.shape} vs labels {g.shape}")
    s = np.concatenate([x.ravel() for x in s_list])
    g = np.concatenate([x.ravel() != 0 for x in l_list])
    if s.size == 0:
        raise ValueError("no scores given")
    from sklearn.metrics import f1_score
    return float(f1_score(g, s >= threshold, zero_division=0.0))


# --------------------------------------------------------------------------- all at once


def evaluate(
    maps: ImageStack,
    masks: Sequence[npt.ArrayLike | None] | np.ndarray,
    labels: npt.ArrayLike,
    image_score: Callable[[np.ndarray], float] | None = None,
) -> dict[str, float]:
    """Pixel AUROC, image AUROC (score = max of map, or ``image_score(map)``) and AU-PRO (FPR <= 0.3) of a test set.

    A ``None`` mask means "no ground truth": for a good image (label 0) it is taken as all
    zeros (good images have no anomalous pixel); an anomalous image (label 1) with a
    ``None`` mask is left out of the pixel metrics but kept for the image AUROC. If no
    anomalous image has a mask, the pixel metrics are NaN.

    Args:
        maps: ``N x H x W`` array or sequence of ``H_i x W_i`` anomaly maps.
        masks: ``N x H x W`` array or sequence of ``H_i x W_i`` masks or ``None``.
        labels: ``(N,)`` image labels, 0 good, 1 anomalous.
        image_score: one ``H_i x W_i`` map -> its image score (default: the maximum).

    Returns:
        ``{"pixel_auroc", "image_auroc", "pixel_aupro"}`` as python floats.
    """
    map_list = _as_image_list(maps, "maps")
    labels_N = np.asarray(labels).ravel()
    if not np.all(np.isin(labels_N, (0, 1))):
        raise ValueError(f"labels must be 0 (good) or 1 (anomalous), got {np.unique(labels_N)}")
    mask_seq = list(masks)
    if not len(map_list) == len(mask_seq) == labels_N.size:
        raise ValueError(
            f"got {len(map_list)} maps, {len(mask_seq)} masks and {labels_N.size} labels")

    pix_maps, pix_masks = [], []
    for m, g, y in zip(map_list, mask_seq, labels_N):
        if g is None:
            if y == 1:
                continue
            g = np.zeros(m.shape, dtype=bool)
        pix_maps.append(m)
        pix_masks.append(np.asarray(g))

    scores = (image_scores(map_list) if image_score is None
              else np.array([image_score(m) for m in map_list], dtype=np.float64))
    result = {"image_auroc": image_auroc(scores, labels_N)}
    if any(y == 1 and g is not None for g, y in zip(mask_seq, labels_N)):
        result["pixel_auroc"] = pixel_auroc(pix_maps, pix_masks)
        result["pixel_aupro"] = pixel_aupro(pix_maps, pix_masks, fpr_limit=0.3)
    else:
        result["pixel_auroc"] = float("nan")
        result["pixel_aupro"] = float("nan")
    return {k: float(result[k]) for k in ("pixel_auroc", "image_auroc", "pixel_aupro")}
