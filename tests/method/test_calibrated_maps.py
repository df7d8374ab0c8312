"""The normal-calibrated (nce) map and the image scores (iepjax.calibrated_maps; docs/method.md,
Normal-calibrated maps). Numpy only: small synthetic normal images whose residual depends on the
image's local contrast and grows towards the border, as a blurry autoencoder's does."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
from scipy import ndimage

from iepjax import calibrated_maps as C
from iepjax.config import MapConfig, ThresholdConfig, default_map, from_dict, to_dict

CFG = default_map("nce")
SIZE = 48


def normal_pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n images (uint8, SIZE x SIZE x 3) of a random texture whose contrast varies over the image,
    and raw residual maps: |noise| scaled by the local contrast and by a border factor."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    d = np.minimum(np.minimum(yy, SIZE - 1 - yy), np.minimum(xx, SIZE - 1 - xx))
    images, maps = [], []
    for _ in range(n):
        contrast = 0.05 + 0.3 * ndimage.gaussian_filter(rng.random((SIZE, SIZE)), 6)
        contrast = contrast / contrast.max() * 0.4
        x = np.clip(0.5 + contrast * ndimage.gaussian_filter(rng.standard_normal((SIZE, SIZE)), 1) * 2, 0, 1)
        images.append(np.repeat((x * 255).astype(np.uint8)[..., None], 3, -1))
        maps.append(np.abs(rng.standard_normal((SIZE, SIZE))) * contrast * (1 + 0.8 * np.exp(-d / 2)))
    return np.stack(images), np.stack(maps)


@pytest.fixture(scope="module")
def fitted():
    images, maps = normal_pairs(40, seed=0)
    return C.fit_normal(maps, images, CFG)


def test_fit_takes_normal_images_only():
    """No label, mask or test image can reach the fit: its only inputs are normal maps, normal images
    and the settings; and it depends on the set of normal images, not on their order."""
    assert list(inspect.signature(C.fit_normal).parameters) == ["normal_maps", "normal_images", "cfg"]
    images, maps = normal_pairs(12, seed=3)
    a = C.fit_normal(maps, images, CFG)
    order = np.random.default_rng(0).permutation(12)
    b = C.fit_normal(maps[order], images[order], CFG)
    for k in C.TABLES:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-12)
    assert a["eps"] == pytest.approx(b["eps"])
    n_bins = CFG.feature_bins * (len(CFG.border_bands) + 1)
    assert a["tail_qs"].shape == (n_bins, CFG.n_grid) and a["border_profile"].shape == (CFG.border_reach,)
    assert a["border_profile"][0] > 1.3  # the residual's border excess is measured


def test_new_normal_images_get_calibrated_tail_probabilities(fitted):
    """On new normal images from the fitted distribution, p = 10^-A is about uniform: the fraction of
    pixels with p <= a is about a (pixels are correlated by the window, so the tolerance is loose)."""
    images, maps = normal_pairs(30, seed=1)
    p = 10.0 ** -np.stack(C.nce_maps(fitted, maps, images, CFG))
    for a in (0.5, 0.2, 0.05, 0.01):
        assert abs(np.mean(p <= a) - a) < 0.2 * a + 0.005, (a, np.mean(p <= a))
    # one-sided only too much residual would be flagged; two-sided, too little is as well
    flat = maps[0].copy()
    flat[16:32, 16:32] = 0.0
    A = C.nce_map(fitted, flat, images[0], CFG)
    assert np.median(A[20:28, 20:28]) > 2.0 > np.median(A[36:44, 4:12])


def test_scaling_the_residual_changes_nothing(fitted):
    """A depends on the map through log-energy differences and quantiles: multiply every map, normal
    and test, by c (so eps, fitted from them, scales by c^2) and A is the same."""
    images, maps = normal_pairs(40, seed=0)
    scaled = C.fit_normal(maps * 7.5, images, CFG)
    assert scaled["eps"] == pytest.approx(fitted["eps"] * 7.5 ** 2, rel=1e-9)
    test_images, test_maps = normal_pairs(3, seed=2)
    for m, x in zip(test_maps, test_images):
        np.testing.assert_allclose(C.nce_map(scaled, 7.5 * m, x, CFG), C.nce_map(fitted, m, x, CFG), atol=2e-4)


def test_tables_survive_json(fitted):
    import json
    back = C.from_json(json.loads(json.dumps(C.to_json(fitted))))
    images, maps = normal_pairs(1, seed=5)
    np.testing.assert_array_equal(C.nce_map(back, maps[0], images[0], CFG), C.nce_map(fitted, maps[0], images[0], CFG))


def test_image_scores_by_hand():
    m = np.zeros((10, 10))
    m[2, 3], m[5, 5], m[7, 1], m[0, 0] = 9.0, 6.0, 3.0, 1.0
    assert C.image_score(m, MapConfig(image_score="max")) == 9.0
    assert C.image_score(m, MapConfig(image_score="topk", topk_frac=0.03)) == pytest.approx(6.0)  # (9 + 6 + 3) / 3
    assert C.image_score(m, MapConfig(image_score="topk", topk_frac=0.001)) == 9.0  # at least one pixel
    assert C.image_score(m, MapConfig(image_score="area"), pixel_threshold=3.0) == pytest.approx(0.03)
    with pytest.raises(ValueError, match="pixel threshold"):
        C.image_score(m, MapConfig(image_score="area"))
    impulse = np.zeros((21, 21))
    impulse[10, 10] = 1.0
    k = np.exp(-0.5 * np.arange(-4, 5) ** 2)  # scipy's kernel for sigma 1: radius 4 sigma, normalised
    assert C.image_score(impulse, MapConfig(image_score="smoothed_max", smoothed_max_sigma=1.0)) == pytest.approx(
        (1 / k.sum()) ** 2, rel=1e-6)
    np.testing.assert_allclose(C.image_scores([m, 2 * m], MapConfig(image_score="max")), [9.0, 18.0])


def test_the_predictor_scores_images_as_project_does():
    """An exported model's predictor (`predictor.image_score`, numpy only) gives the image scores of
    `calibrated_maps.image_score` for the scores it can be exported with, the defaults included."""
    from iepjax.predictor import image_score
    maps = np.random.default_rng(0).gamma(2.0, 0.05, size=(3, 64, 64))
    for cfg in (MapConfig(image_score="max"), default_map("paper"), MapConfig(image_score="topk", topk_frac=0.02)):
        rule = {"image_score": cfg.image_score, "topk_frac": cfg.topk_frac}
        assert [image_score(m, rule) for m in maps] == [C.image_score(m, cfg) for m in maps]
    assert default_map() == MapConfig() == ThresholdConfig().map  # the dataclass defaults are the chosen ones
    assert (default_map().image_score, default_map().topk_frac, default_map("nce").topk_frac) == ("topk", 0.001, 0.005)


def test_map_config_checks_and_round_trips():
    with pytest.raises(ValueError, match="kind"):
        MapConfig(kind="ssim")
    with pytest.raises(ValueError, match="image_score"):
        MapConfig(image_score="mean")
    with pytest.raises(ValueError, match="border_bands"):
        MapConfig(border_bands=(3, 1))
    t = ThresholdConfig(map=CFG)
    assert from_dict(ThresholdConfig, to_dict(t)) == t


def test_export_refuses_thresholds_of_another_map(tmp_path):
    """export.py ships the paper's map scored by its max or its top-k mean: thresholds fitted for the nce map (or
    another image score) are refused, those of the paper's map pass and give the predictor's rule."""
    from iepjax.export import check_paper_map
    max_rule = {"image_score": "max"}
    assert check_paper_map({"grad": {}, "recon": {}}, tmp_path) == max_rule  # older files: no "map", the paper's
    assert check_paper_map({"map": {"kind": "paper", "image_score": "max"}}, tmp_path) == max_rule
    assert check_paper_map({"map": default_map().score_record()}, tmp_path) == {"image_score": "topk", "topk_frac": 0.001}
    for stored in ({"map": {"kind": "nce", "image_score": "topk"}}, {"map": {"kind": "paper", "image_score": "area"}},
                   {"grad": {"map_fit": {"eps": 1.0}}}):
        with pytest.raises(ValueError, match="--map paper"):
            check_paper_map(stored, tmp_path)
