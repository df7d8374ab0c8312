"""Tests for iepjax.metrics: against sklearn, an independent slow AU-PRO, and hand cases."""
from __future__ import annotations


import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from iepjax import metrics

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy >= 2 renamed trapz


# ----------------------------------------------------------------- independent reference


def _components_8(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a 2-D bool mask by flood fill (no scipy)."""
    mask = np.asarray(mask) != 0
    seen = np.zeros_like(mask)
    regions = []
    h, w = mask.shape
    for i0 in range(h):
        for j0 in range(w):
            if not mask[i0, j0] or seen[i0, j0]:
                continue
            region = np.zeros_like(mask)
            stack = [(i0, j0)]
            seen[i0, j0] = True
            while stack:
                i, j = stack.pop()
                region[i, j] = True
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        a, b = i + di, j + dj
                        if 0 <= a < h and 0 <= b < w and mask[a, b] and not seen[a, b]:
                            seen[a, b] = True
                            stack.append((a, b))
            regions.append(region)
    return regions


def _slow_aupro(maps, masks, fpr_limit=0.3):
    """AU-PRO by brute force: every distinct score is a threshold, loop over regions."""
    regions = [(n, r) for n, g in enumerate(masks) for r in _components_8(g)]
    scores = np.concatenate([np.ravel(m) for m in maps])
    normal = np.concatenate([np.ravel(g) == 0 for g in masks])
    fprs, pros = [0.0], [0.0]
    for t in np.unique(scores)[::-1]:
        fprs.append(np.sum((scores >= t) & normal) / np.sum(normal))
        pros.append(np.mean([np.mean(np.asarray(maps[n])[r] >= t) for n, r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= fpr_limit
    x, y = fprs[keep], pros[keep]
    if x[-1] < fpr_limit:
        j = int(np.sum(keep))  # first point beyond the limit
        y_lim = np.interp(fpr_limit, fprs[j - 1:j + 1], pros[j - 1:j + 1])
        x, y = np.append(x, fpr_limit), np.append(y, y_lim)
    return _trapezoid(y, x) / fpr_limit


def _random_case(seed, n=4, h=9, w=11, levels=12):
    """Random maps with many ties and masks with several (some diagonal) regions."""
    rng = np.random.default_rng(seed)
    masks = (rng.random((n, h, w)) < 0.12).astype(np.uint8)
    masks[0] = 0  # one good image
    masks[1, 0, 0] = masks[1, 1, 1] = 1  # a diagonal pair
    maps = rng.integers(0, levels, size=(n, h, w)) / levels + 0.3 * masks
    return maps.astype(np.float32), masks


# ----------------------------------------------------------------- pixel AUROC


def test_pixel_auroc_matches_sklearn_on_stacked_array():
    rng = np.random.default_rng(0)
    masks = rng.random((5, 8, 8)) < 0.2
    maps = rng.normal(size=(5, 8, 8)) + masks
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)
    assert metrics.pixel_auroc(maps, masks.astype(np.uint8) * 255) == pytest.approx(expected)


def test_pixel_auroc_matches_sklearn_on_list_of_different_sizes():
    rng = np.random.default_rng(1)
    shapes = [(5, 7), (9, 4), (3, 3)]
    masks = [rng.random(s) < 0.3 for s in shapes]
    maps = [rng.normal(size=s) + 0.5 * g for s, g in zip(shapes, masks)]
    expected = roc_auc_score(np.concatenate([g.ravel() for g in masks]),
                             np.concatenate([m.ravel() for m in maps]))
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------- image level


def test_image_scores_and_auroc_hand_case():
    maps = np.zeros((4, 2, 3))
    maps[0, 1, 2] = 0.1
    maps[1, 0, 0] = 0.7
    maps[2, 1, 1] = 0.4
    maps[3, 0, 2] = 0.9
    np.testing.assert_allclose(metrics.image_scores(maps), [0.1, 0.7, 0.4, 0.9])
    np.testing.assert_allclose(metrics.image_scores(list(maps)), [0.1, 0.7, 0.4, 0.9])
    # labels: good = {0.1, 0.7}, anomalous = {0.4, 0.9}. Pairs (anom > good):
    # 0.4>0.1 yes, 0.4>0.7 no, 0.9>0.1 yes, 0.9>0.7 yes -> 3/4.
    assert metrics.image_auroc(metrics.image_scores(maps), [0, 0, 1, 1]) == pytest.approx(0.75)


def test_image_auroc_needs_both_classes():
    with pytest.raises(ValueError, match="no anomalous images"):
        metrics.image_auroc([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="2 scores but 3 labels"):
        metrics.image_auroc([0.1, 0.2], [0, 1, 1])


# ----------------------------------------------------------------- AU-PRO


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_slow_reference(seed, fpr_limit):
    maps, masks = _random_case(seed)
    assert len(np.unique(maps)) < maps.size // 4  # plenty of ties
    expected = _slow_aupro(maps, masks, fpr_limit)
    got = metrics.pixel_aupro(maps, masks, fpr_limit=fpr_limit)
    assert got == pytest.approx(expected, abs=1e-10)
    assert 0.0 <= got <= 1.0


def test_aupro_matches_slow_reference_on_list_of_different_sizes():
    rng = np.random.default_rng(3)
    shapes = [(6, 9), (10, 5), (7, 7)]
    masks = [(rng.random(s) < 0.15).astype(np.uint8) for s in shapes]
    maps = [np.round(rng.random(s) + 0.4 * g, 1) for s, g in zip(shapes, masks)]
    assert metrics.pixel_aupro(maps, masks) == pytest.approx(_slow_aupro(maps, masks), abs=1e-10)


def test_pro_curve_points_against_slow_reference():
    maps, masks = _random_case(4)
    fpr, pro = metrics.pro_curve(maps, masks)
    n_thresholds = len(np.unique(maps))
    assert fpr.shape == pro.shape == (n_thresholds + 1,)
    assert (fpr[0], pro[0]) == (0.0, 0.0)
    assert (fpr[-1], pro[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)


def test_aupro_hand_case_1x6_with_a_tie():
    # scores: [0.9, 0.2, 0.8, 0.5, 0.5, 0.1]
    # mask:   [1,   1,   0,   1,   0,   0  ]
    # Regions: A = pixels {0, 1} (size 2), B = {3} (size 1); normal pixels {2, 4, 5} (3).
    # Distinct thresholds (descending), positives = score >= t:
    #   t=0.9: {0}            FPR 0,   PRO mean(1/2, 0) = 0.25
    #   t=0.8: {0,2}          FPR 1/3, PRO 0.25
    #   t=0.5: {0,2,3,4}      FPR 2/3, PRO mean(1/2, 1) = 0.75   (tie: 3 and 4 together)
    #   t=0.2: {0,1,2,3,4}    FPR 2/3, PRO 1
    #   t=0.1: all            FPR 1,   PRO 1
    # Curve: (0,0) (0,.25) (1/3,.25) (2/3,.75) (2/3,1) (1,1).
    # limit 0.3: area = 0.3 * 0.25 = 0.075 -> /0.3 = 0.25
    # limit 0.5: [0,1/3]: 0.25/3 = 1/12; PRO(0.5) = 0.25 + 0.5*(0.5-1/3)/(1/3) = 0.5,
    #            [1/3,0.5]: (0.25+0.5)/2 * 1/6 = 1/16; total 1/12 + 1/16 = 7/48 -> /0.5 = 7/24
    #            (breaking the tie 3-before-4 would give (1/12 + 0.75/6)/0.5 = 5/12 instead)
    # limit 1.0: 1/12 + (1/3)(0.25+0.75)/2 + 0 + (1/3)*1 = 1/12 + 1/6 + 1/3 = 7/12
    maps = np.array([[[0.9, 0.2, 0.8, 0.5, 0.5, 0.1]]])
    masks = np.array([[[1, 1, 0, 1, 0, 0]]], dtype=bool)
    fpr, pro = metrics.pro_curve(maps, masks)
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 2 / 3, 2 / 3, 1])
    np.testing.assert_allclose(pro, [0, 0.25, 0.25, 0.75, 1, 1])
    assert metrics.pixel_aupro(maps, masks) == pytest.approx(0.25)
    assert metrics.pixel_aupro(maps, masks, fpr_limit=0.5) == pytest.approx(7 / 24)
    assert metrics.pixel_aupro(maps, masks, fpr_limit=1.0) == pytest.approx(7 / 12)


def test_aupro_eight_connectivity_diagonal_pixels_are_one_region():
    # Mask (3x4): (0,0) and (1,1) touch diagonally -> ONE region {a, b} (size 2);
    # (2,3) is a second region c. Scores: a = 0.9, b = c = 0.1, normal pixels 0.5.
    #   t=0.9: FPR 0, PRO = mean(1/2, 0) = 0.25  (4-connectivity: mean(1, 0, 0) = 1/3)
    #   t=0.5: FPR 1, PRO 0.25; t=0.1: FPR 1, PRO 1.
    # AU-PRO(0.3) = 0.25 (it would be 1/3 with 4-connected regions).
    mask = np.zeros((3, 4), dtype=np.uint8)
    mask[0, 0] = mask[1, 1] = mask[2, 3] = 1
    score = np.full((3, 4), 0.5)
    score[0, 0], score[1, 1], score[2, 3] = 0.9, 0.1, 0.1
    assert metrics.pixel_aupro([score], [mask]) == pytest.approx(0.25)
    assert metrics.pixel_aupro([score], [mask]) != pytest.approx(1 / 3)


def test_aupro_regions_do_not_join_across_images():
    # Same pixels as one region per image: image 1 has a at (0,0), image 2 has b at (0,0).
    # Two regions: t=0.9 gives PRO mean(1, 0) = 0.5 -> AU-PRO(0.3) = 0.5.
    score = np.full((2, 2, 2), 0.5)
    score[0, 0, 0], score[1, 0, 0] = 0.9, 0.1
    mask = np.zeros((2, 2, 2), dtype=bool)
    mask[:, 0, 0] = True
    assert metrics.pixel_aupro(score, mask) == pytest.approx(0.5)


def test_aupro_perfect_and_worst_maps():
    _, masks = _random_case(5)
    perfect = masks.astype(np.float64)
    assert metrics.pixel_aupro(perfect, masks) == pytest.approx(1.0)
    assert metrics.pixel_aupro(perfect, masks, fpr_limit=1.0) == pytest.approx(1.0)
    assert metrics.pixel_auroc(perfect, masks) == pytest.approx(1.0)
    assert metrics.pixel_aupro(-perfect, masks) == pytest.approx(0.0)
    constant = np.zeros(masks.shape)
    # one threshold: curve (0,0) -> (1,1); area up to 0.3 = 0.3 * 0.3 / 2 -> /0.3 = 0.15
    assert metrics.pixel_aupro(constant, masks) == pytest.approx(0.15)
    assert metrics.pixel_aupro(constant, masks, fpr_limit=1.0) == pytest.approx(0.5)


def test_aupro_in_unit_interval_on_random_data():
    rng = np.random.default_rng(6)
    for _ in range(5):
        masks = rng.random((3, 12, 12)) < rng.uniform(0.02, 0.5)
        maps = rng.normal(size=masks.shape) * rng.uniform(0.1, 3) + rng.normal() * masks
        for limit in (0.01, 0.3, 1.0):
            assert 0.0 <= metrics.pixel_aupro(maps, masks, fpr_limit=limit) <= 1.0


def test_aupro_on_a_realistic_split_size():
    rng = np.random.default_rng(7)
    masks = np.zeros((40, 128, 128), dtype=bool)
    masks[::2, 30:60, 40:90] = True
    masks[1::4, 100:110, 5:20] = True
    maps = rng.random(masks.shape, dtype=np.float32) + 0.5 * masks
    value = metrics.pixel_aupro(maps, masks)
    assert 0.0 < value <= 1.0


# ----------------------------------------------------------------- errors


def test_errors_are_clear():
    maps = np.random.default_rng(8).random((2, 4, 4))
    with pytest.raises(ValueError, match="no anomalous pixels"):
        metrics.pixel_aupro(maps, np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="no anomalous pixels"):
        metrics.pixel_auroc(maps, np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="no normal pixels"):
        metrics.pixel_aupro(maps, np.ones((2, 4, 4)))
    with pytest.raises(ValueError, match="no normal pixels"):
        metrics.pixel_auroc(maps, np.ones((2, 4, 4)))
    bad_masks = [np.zeros((4, 4)), np.ones((4, 5))]
    with pytest.raises(ValueError, match="index 1"):
        metrics.pixel_aupro(list(maps), bad_masks)
    with pytest.raises(ValueError, match="index 1"):
        metrics.pixel_auroc(list(maps), bad_masks)
    with pytest.raises(ValueError, match="2 maps but 1 masks"):
        metrics.pixel_aupro(maps, np.ones((1, 4, 4)))
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.pixel_aupro(maps, maps > 0.5, fpr_limit=0.0)
    with pytest.raises(ValueError, match="NaN"):
        metrics.pixel_aupro(np.full((2, 4, 4), np.nan), maps > 0.5)


# ----------------------------------------------------------------- F1 and evaluate


def test_f1_at_threshold_image_and_pixel_level():
    # scores >= 0.5 -> predicted [1, 1, 0, 0]; labels [1, 0, 1, 0]: TP 1, FP 1, FN 1 -> F1 = 0.5
    assert metrics.f1_at_threshold([0.9, 0.5, 0.4, 0.1], [1, 0, 1, 0], 0.5) == pytest.approx(0.5)
    # pixel level, two maps of different sizes: TP 2, FP 0, FN 1 -> F1 = 4 / 5
    maps = [np.array([[0.9, 0.1]]), np.array([[0.8], [0.2], [0.3]])]
    masks = [np.array([[1, 0]]), np.array([[1], [1], [0]])]
    assert metrics.f1_at_threshold(maps, masks, 0.5) == pytest.approx(0.8)


def test_evaluate_with_none_masks():
    rng = np.random.default_rng(9)
    maps = rng.random((5, 6, 6))
    mask_anom = np.zeros((6, 6), dtype=np.uint8)
    mask_anom[2:4, 1:5] = 1
    maps[2] += 0.6 * mask_anom
    masks = [np.zeros((6, 6)), None, mask_anom, None, mask_anom]
    labels = [0, 0, 1, 1, 1]
    out = metrics.evaluate(maps, masks, labels)
    assert set(out) == {"pixel_auroc", "image_auroc", "pixel_aupro"}
    assert all(type(v) is float for v in out.values())
    # Pixel metrics: images 0, 1 (good, None -> all zeros), 2, 4; image 3 (anomalous, None) out.
    used_maps = maps[[0, 1, 2, 4]]
    used_masks = np.stack([np.zeros((6, 6)), np.zeros((6, 6)), mask_anom, mask_anom])
    assert out["pixel_auroc"] == pytest.approx(
        roc_auc_score(used_masks.ravel() > 0, used_maps.ravel()))
    assert out["pixel_aupro"] == pytest.approx(_slow_aupro(used_maps, used_masks))
    assert out["image_auroc"] == pytest.approx(
        roc_auc_score(labels, maps.reshape(5, -1).max(axis=1)))


def test_evaluate_without_any_ground_truth_gives_nan_pixel_metrics():
    maps = np.random.default_rng(10).random((3, 4, 4))
    out = metrics.evaluate(maps, [None, None, None], [0, 1, 1])
    assert np.isnan(out["pixel_auroc"]) and np.isnan(out["pixel_aupro"])
    assert 0.0 <= out["image_auroc"] <= 1.0
    with pytest.raises(ValueError, match="labels"):
        metrics.evaluate(maps, [None, None, None], [0, 2, 1])
