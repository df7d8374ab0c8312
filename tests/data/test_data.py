"""Tests of iepjax.data: the `textures` TFDS builder, the defect functions and load_split.

Builds use small split sizes (config overrides) and tmp dirs, so the module runs in seconds.
brick and grass records are pinned by digests (the data of existing results must not move); the
other categories (tissue RGB, tissue_gray, weave) are built small, with every defect kind.

Train/test disjointness is checked twice: the crop origins from `plan_split` lie inside the
split's region (default: train columns [0, 320), test columns [320, 512), all rows; crops never straddle), and every
stored image really is the photo at that origin (exactly for good crops, outside the mask for
defect crops), so the origins cannot lie.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
import sys

import numpy as np
import pytest
from scipy import ndimage

from iepjax.data import CATEGORIES, Split, get_builder, load_split
from iepjax.data import defects as D
from iepjax.data import textures as T

SMALL = dict(num_train=8, num_test=16)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """brick built twice with seed 0 (two dirs) and once with seed 1; small splits."""
    out = {}
    for key, seed in (("a", 0), ("b", 0), ("c", 1)):
        d = tmp_path_factory.mktemp(f"tfds_{key}")
        out[key] = {
            "dir": d,
            "train": load_split("textures", "brick", "train", str(d), seed=seed, **SMALL),
            "test": load_split("textures", "brick", "test", str(d), seed=seed, **SMALL),
        }
    return out


def _assert_split_equal(x: Split, y: Split) -> None:
    np.testing.assert_array_equal(x.images, y.images)
    np.testing.assert_array_equal(x.masks, y.masks)
    np.testing.assert_array_equal(x.labels, y.labels)
    assert x.defect_types == y.defect_types and x.ids == y.ids


def test_no_tensorflow_imported(built):
    assert "tensorflow" not in sys.modules


def test_shapes_and_dtypes(built):
    for split, n in (("train", 8), ("test", 16)):
        s = built["a"][split]
        assert s.images.shape == (n, 128, 128, 1) and s.images.dtype == np.uint8
        assert s.masks.shape == (n, 128, 128) and s.masks.dtype == bool
        assert s.labels.shape == (n,) and np.issubdtype(s.labels.dtype, np.integer)
        assert len(s.defect_types) == len(s.ids) == n
        assert len(set(s.ids)) == n
        assert all(i.startswith(t + "/") for i, t in zip(s.ids, s.defect_types))


def test_same_seed_identical_across_dirs(built):
    for split in ("train", "test"):
        _assert_split_equal(built["a"][split], built["b"][split])
    # The stored array_record files are byte-identical too.
    for split in ("train", "test"):
        fa = sorted(pathlib.Path(built["a"]["dir"]).rglob(f"textures-{split}.array_record*"))
        fb = sorted(pathlib.Path(built["b"]["dir"]).rglob(f"textures-{split}.array_record*"))
        assert fa and len(fa) == len(fb)
        for pa, pb in zip(fa, fb):
            assert pa.read_bytes() == pb.read_bytes()


def test_different_seed_differs(built):
    for split in ("train", "test"):
        assert not np.array_equal(built["a"][split].images, built["c"][split].images)


def test_train_all_good(built):
    s = built["a"]["train"]
    assert set(s.defect_types) == {"good"}
    assert not s.labels.any() and not s.masks.any()


def test_test_composition(built):
    s = built["a"]["test"]
    n_def = int(s.labels.sum())
    assert n_def == 8  # half of 16
    kinds = [t for t in s.defect_types if t != "good"]
    assert sorted(set(kinds)) == sorted(D.STRUCTURE_KINDS)
    counts = [kinds.count(k) for k in D.STRUCTURE_KINDS]
    assert max(counts) - min(counts) <= 1  # balanced
    for lab, t in zip(s.labels, s.defect_types):
        assert lab == (t != "good")


def test_masks_nonempty_exactly_for_defects(built):
    s = built["a"]["test"]
    for m, lab in zip(s.masks, s.labels):
        assert m.any() == bool(lab)
        if lab:
            assert m.mean() < 0.1  # a local defect, not the whole image


def _check_against_photo(cfg, splits: dict[str, Split]) -> None:
    """Crops lie in their split's region, are the photo there (exactly outside the masks), and
    the two splits cover disjoint pixels of the photo."""
    photo = T.photo(cfg.photo)
    s_px = cfg.crop_size
    covered = {}
    for split, s in splits.items():
        specs = {sp.id: sp for sp in T.plan_split(cfg, split)}
        assert sorted(specs) == s.ids
        r0, r1, c0, c1 = cfg.region(split)
        pixels = np.zeros(photo.shape[:2], bool)
        for img, mask, i in zip(s.images, s.masks, s.ids):
            sp = specs[i]
            assert r0 <= sp.row and sp.row + s_px <= r1 and c0 <= sp.col and sp.col + s_px <= c1
            pixels[sp.row : sp.row + s_px, sp.col : sp.col + s_px] = True
            clean = T.clean_crop(cfg, sp)
            window = photo[sp.row : sp.row + s_px, sp.col : sp.col + s_px]
            np.testing.assert_array_equal(clean, window.reshape(clean.shape))
            # Exact masks: outside the mask the stored image is the clean crop, bit for bit;
            # inside, most pixels changed.
            np.testing.assert_array_equal(img[~mask], clean[~mask])
            if mask.any():
                assert (img[mask] != clean[mask]).mean() > 0.5
        covered[split] = pixels
    assert cfg.train_region[3] <= cfg.test_region[2]  # side by side
    assert not (covered["train"] & covered["test"]).any()


@pytest.mark.parametrize("seed", [0, 1])
def test_regions_disjoint_and_masks_exact(built, seed):
    key = "a" if seed == 0 else "c"
    cfg = T.make_config("brick", seed=seed, **SMALL)
    _check_against_photo(cfg, {split: built[key][split] for split in ("train", "test")})
    with pytest.raises(ValueError, match="overlap"):
        T.plan_split(T.make_config("brick", train_region=(0, 512, 0, 320), test_region=(0, 512, 300, 512)), "test")


def test_defects_subtle_not_saturated(built):
    s = built["a"]["test"]
    cfg = T.make_config("brick", seed=0, **SMALL)
    specs = {sp.id: sp for sp in T.plan_split(cfg, "test")}
    for img, mask, i, t in zip(s.images, s.masks, s.ids, s.defect_types):
        if t == "good":
            continue
        clean = T.clean_crop(cfg, specs[i]).astype(float)
        diff = np.abs(img.astype(float) - clean)[mask]
        assert diff.mean() < 0.3 * 255, (i, diff.mean())
        assert (img[mask] == 0).mean() < 0.05 and (img[mask] == 255).mean() < 0.05, i


def test_grass_default_names_and_unknowns(tmp_path):
    s = load_split("textures", "grass", "test", str(tmp_path), num_train=4, num_test=8)
    assert s.images.shape == (8, 128, 128, 1) and s.labels.sum() == 4
    assert sorted({t for t in s.defect_types if t != "good"}) == sorted(D.STRUCTURE_KINDS)
    assert [c.name for c in T.Textures.BUILDER_CONFIGS] == list(CATEGORIES["textures"])
    assert T.make_config("brick").name == "brick"
    assert T.make_config("brick", seed=3).name != "brick"
    with pytest.raises(ValueError, match="brick, grass"):
        load_split("textures", "gravel", "test", str(tmp_path))
    with pytest.raises(ValueError, match="textures"):
        load_split("mvtec_nope", "brick", "test", str(tmp_path))
    with pytest.raises(ValueError, match="train, test"):
        load_split("textures", "brick", "validation", str(tmp_path))
    with pytest.raises(ValueError, match="unknown textures config"):
        T.make_config("brick", nope=1)


def test_grass_differs_from_brick_plan():
    a = T.plan_split(T.make_config("brick"), "test")
    b = T.plan_split(T.make_config("grass"), "test")
    assert [(x.row, x.col) for x in a] != [(x.row, x.col) for x in b]


# ------------------------------------------------------------------ the other categories

NEW_CATEGORIES = ("tissue", "tissue_gray", "weave")


def test_photo_shapes():
    for name in T.PHOTOS:
        img = T.photo(name)
        h, w, c = T.PHOTO_SHAPES[name]
        assert img.dtype == np.uint8 and img.shape == ((h, w) if c == 1 else (h, w, c)), name
        assert not img.flags.writeable
        assert img.std() > 10, name  # a texture, not a flat image
    assert T.PHOTO_SHAPES["tissue"][2] == 3 and T.PHOTO_SHAPES["tissue_gray"][2] == 1
    assert list(T.PHOTOS[:2]) == ["brick", "grass"]  # the rng codes of brick and grass stay 0 and 1


def test_weave_regular_not_a_copy():
    """The weave repeats with the plain weave's period (two pitches) but never exactly."""
    w = T.photo("weave").astype(float)
    np.testing.assert_array_equal(T.weave(), T.photo("weave"))  # deterministic
    period = 2 * T.WEAVE_PITCH_PX
    for axis in (0, 1):
        a = np.take(w, np.arange(0, 512 - period), axis=axis)
        b = np.take(w, np.arange(period, 512), axis=axis)
        c = np.take(w, np.arange(period // 2, 512 - period // 2), axis=axis)
        r_period = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        r_half = np.corrcoef(a.ravel(), c.ravel())[0, 1]  # one pitch: the other thread on top
        assert 0.3 < r_period < 0.95 and r_half < r_period, (axis, r_period, r_half)


@pytest.fixture(scope="module")
def built_new(tmp_path_factory):
    """Each new category built with small splits and every defect kind (one of each)."""
    out = {}
    for name in NEW_CATEGORIES:
        d = tmp_path_factory.mktemp(f"tfds_{name}")
        kw = dict(num_train=4, num_test=14, defect_kinds=D.DEFECT_KINDS)
        out[name] = {split: load_split("textures", name, split, str(d), **kw) for split in ("train", "test")}
    return out


@pytest.mark.parametrize("name", NEW_CATEGORIES)
def test_new_category_records(built_new, name, tmp_path):
    channels = T.PHOTO_SHAPES[name][2]
    cfg = T.make_config(name, num_train=4, num_test=14, defect_kinds=D.DEFECT_KINDS)
    train, test = built_new[name]["train"], built_new[name]["test"]
    assert train.images.shape == (4, 128, 128, channels) and train.images.dtype == np.uint8
    assert test.images.shape == (14, 128, 128, channels) and test.masks.shape == (14, 128, 128)
    assert set(train.defect_types) == {"good"} and not train.masks.any()
    assert sorted(t for t in test.defect_types if t != "good") == sorted(D.DEFECT_KINDS)
    for img, mask, lab in zip(test.images, test.masks, test.labels):
        assert mask.any() == bool(lab) and mask.mean() < 0.1
    _check_against_photo(cfg, {"train": train, "test": test})
    specs = {sp.id: sp for sp in T.plan_split(cfg, "test")}
    for img, mask, i, t in zip(test.images, test.masks, test.ids, test.defect_types):
        if t != "good":  # subtle, not saturated
            clean = T.clean_crop(cfg, specs[i]).astype(float)
            assert np.abs(img.astype(float) - clean)[mask].mean() < 0.3 * 255, i
    # The registered default config stores the photo's channels.
    assert get_builder("textures", name, str(tmp_path)).info.features["image"].shape == (128, 128, channels)


# Digest of every record (both splits, default sizes) of brick and grass as built by version
# 1.1.0 of the builder, with the four structure kinds: guards that adding defect kinds, config
# fields or categories leaves these data bit-identical (metrics compared across code changes need
# the same data). A deliberate change of the records bumps Textures.VERSION and adds its digests.
_RECORD_DIGESTS = {
    "1.1.0": {
        "brick": "09b1366bc3cc782880a338b040d41569f0144cd1b30db80549bf465820a8507d",
        "grass": "62c6a175eb1d368ecc494496f4f610407c799583a086cc29bca10922d7869b5e",
    },
}


@functools.lru_cache(maxsize=None)
def _records_digest(photo: str, defect_kinds: tuple[str, ...]) -> str:
    """sha256 over id, defect_type, label, image and mask (dtype, shape, bytes) of every record."""
    cfg = T.make_config(photo, defect_kinds=defect_kinds)
    h = hashlib.sha256()
    for split in T.SPLITS:
        for spec in T.plan_split(cfg, split):
            rec = T.render(cfg, split, spec)
            for key in ("id", "defect_type", "label"):
                h.update(rec[key].encode() + b"\0")
            for key in ("image", "mask"):
                a = np.ascontiguousarray(rec[key])
                h.update(f"{a.dtype}{a.shape}".encode())
                h.update(a.tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("photo", ["brick", "grass"])
def test_default_records_unchanged(photo):
    version = str(T.Textures.VERSION)
    assert version in _RECORD_DIGESTS, f"new builder version {version}: add the digests of its records"
    assert _records_digest(photo, T.DEFAULT_DEFECT_KINDS) == _RECORD_DIGESTS[version][photo]


@pytest.mark.parametrize("photo", ["brick", "grass"])
def test_structure_kinds_reproduce_first_records(photo):
    """The four structure kinds give version 1.1.0's records, whatever the default kinds become."""
    assert _records_digest(photo, D.STRUCTURE_KINDS) == _RECORD_DIGESTS["1.1.0"][photo]


def test_defect_kinds_config(tmp_path):
    kinds = ("blur", "smooth", "lost_texture")
    assert T.make_config("brick").defect_kinds == T.DEFAULT_DEFECT_KINDS
    assert T.make_config("brick", defect_kinds=T.DEFAULT_DEFECT_KINDS).name == "brick"
    cfg = T.make_config("brick", defect_kinds=list(kinds), **SMALL)
    assert cfg.defect_kinds == kinds and cfg.name != T.make_config("brick", **SMALL).name
    for bad in ((), ("blur", "blur"), ("crack",)):
        with pytest.raises(ValueError, match="defect_kinds"):
            T.make_config("brick", defect_kinds=bad)
    # Built through TFDS: every kind drawn, balanced; exact masks (stored image = clean crop outside).
    s = load_split("textures", "brick", "test", str(tmp_path), defect_kinds=kinds, **SMALL)
    found = [t for t in s.defect_types if t != "good"]
    assert sorted(set(found)) == sorted(kinds) and max(map(found.count, kinds)) - min(map(found.count, kinds)) <= 1
    specs = {sp.id: sp for sp in T.plan_split(cfg, "test")}
    for img, mask, i, t in zip(s.images, s.masks, s.ids, s.defect_types):
        clean = T.clean_crop(cfg, specs[i])
        np.testing.assert_array_equal(img[~mask], clean[~mask])
        if t != "good":
            assert 0 < mask.mean() < 0.1 and (img[mask] != clean[mask]).mean() > 0.5
            # Detail loss keeps the mean: under 2 grey levels over the mask, while pixels move more.
            assert abs(img[mask].astype(float).mean() - clean[mask].astype(float).mean()) < 2.0, i


# ----------------------------------------------------------------------- defect functions


@pytest.mark.parametrize("kind", D.DEFECT_KINDS)
@pytest.mark.parametrize("channels", [None, 3])
def test_defect_functions_exact_and_deterministic(kind, channels):
    rng0 = np.random.default_rng(123)
    img = rng0.uniform(0.2, 0.8, size=(64, 64) if channels is None else (64, 64, channels)).astype(np.float32)
    out1, m1 = D.DEFECTS[kind](img, np.random.default_rng(7))
    out2, m2 = D.DEFECTS[kind](img, np.random.default_rng(7))
    np.testing.assert_array_equal(out1, out2)
    np.testing.assert_array_equal(m1, m2)
    assert out1.shape == img.shape and out1.dtype == np.float32
    assert m1.shape == (64, 64) and m1.dtype == bool and m1.any()
    assert out1.min() >= 0.0 and out1.max() <= 1.0
    np.testing.assert_array_equal(out1[~m1], img[~m1])
    assert (np.abs(out1 - img)[m1] > 0).mean() > 0.5
    assert D.DEFECTS[kind].__doc__ and "\n" not in D.DEFECTS[kind].__doc__.strip()


def test_unknown_defect_kind():
    img = np.zeros((32, 32), np.float32)
    with pytest.raises(KeyError, match="valid kinds: blur, foreign, lost_texture, scratch, smooth, spot, stain"):
        D.DEFECTS["crack"]
    with pytest.raises(ValueError, match="unknown defect kind 'crack'"):
        D.apply_defect("crack", img, np.random.default_rng(0))


def test_defect_kind_families():
    assert set(D.STRUCTURE_KINDS) | set(D.DETAIL_LOSS_KINDS) == set(D.DEFECT_KINDS)
    assert not set(D.STRUCTURE_KINDS) & set(D.DETAIL_LOSS_KINDS)


def _local_variance(x: np.ndarray) -> np.ndarray:
    """(H, W, C) -> (H, W): squared deviation from the 3x3 local mean, summed over channels."""
    return ((x - ndimage.uniform_filter(x, size=(3, 3, 1))) ** 2).sum(-1)


def _crops() -> dict[str, np.ndarray]:
    """Float [0, 1] test images: uniform noise and 128 px crops of three photos (1 and 3 channels)."""
    import skimage.data

    return {
        "noise": np.random.default_rng(123).uniform(0.2, 0.8, size=(64, 64)).astype(np.float32),
        "brick": skimage.data.brick()[200:328, 200:328].astype(np.float32) / 255,
        "grass": skimage.data.grass()[200:328, 200:328].astype(np.float32) / 255,
        "ihc": skimage.data.immunohistochemistry()[200:328, 200:328].astype(np.float32) / 255,
    }


@pytest.mark.parametrize("kind", D.DETAIL_LOSS_KINDS)
def test_detail_loss_keeps_mean_and_removes_detail(kind):
    """Detail loss: the region's mean stays (a pure intensity map cannot see it), its local variance drops."""
    for name, x in _crops().items():
        x3 = x.reshape(*x.shape[:2], -1)
        for seed in range(5):
            out, mask = D.apply_defect(kind, x, np.random.default_rng(seed))
            out3 = out.reshape(x3.shape)
            # Mean brightness (per channel) over the mask: unchanged to well under one grey level.
            np.testing.assert_allclose(out3[mask].mean(0), x3[mask].mean(0), atol=1e-3, err_msg=f"{name} {seed}")
            core = ndimage.binary_erosion(mask, iterations=2)
            assert core.sum() >= 20, (name, seed)
            ratio = _local_variance(out3)[core].mean() / _local_variance(x3)[core].mean()
            assert ratio < 0.5, (name, seed, ratio)
