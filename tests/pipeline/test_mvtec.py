"""Tests of the MVTec-layout TFDS builders (mvtec_ad, folder), their errors, and the protocol helpers.

Fast: a fake MVTec tree of real PNG/JPEG/BMP files (iepjax.data.fake_tree) built in tmp dirs; no
model is trained here (tests/pipeline/test_folder.py does the end-to-end run).
"""
from __future__ import annotations

import io
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iepjax.data import DataError, load_split
from iepjax.data import fake_tree
from iepjax.data.preprocess import PatchBank, Preprocess, model_inputs, stitch, tile_positions
from iepjax import outputs, scoring


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return fake_tree.make_fake_mvtec(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def splits(tree, tmp_path_factory):
    tfds_dir = tmp_path_factory.mktemp("tfds")
    return {(c, s): load_split("folder", c, s, str(tfds_dir), source_dir=str(tree), progress=False)
            for c in ("grid", "widget") for s in ("train", "test")}


def _size_on_disk(path):
    with Image.open(path) as im:
        return im.size[1], im.size[0]


def test_folder_records_keep_original_size_and_channels(tree, splits):
    for cat, channels in (("grid", 1), ("widget", 3)):
        test = splits[(cat, "test")]
        assert isinstance(test.images, list)  # one test image has an odd size: not stackable
        assert len(test.ids) == 6 and test.file_names is not None
        for im, m, fn in zip(test.images, test.masks, test.file_names):
            assert im.dtype == np.uint8 and im.shape[2] == channels
            assert im.shape[:2] == m.shape == _size_on_disk(tree / cat / fn)
        train = splits[(cat, "train")]
        assert isinstance(train.images, np.ndarray) and train.images.shape[0] == 6  # same sizes: stacked
        assert all(i.startswith("good/") for i in train.ids)


def test_masks_labels_and_missing_masks(splits):
    test = splits[("grid", "test")]
    by_id = dict(zip(test.ids, range(len(test.ids))))
    for id_, i in by_id.items():
        kind = id_.split("/")[0]
        assert test.defect_types[i] == kind and test.labels[i] == int(kind != "good")
        if kind == "good":
            assert not test.masks[i].any() and test.has_mask[i]
        elif kind == "blob":
            assert test.masks[i].any() and test.has_mask[i]
        else:  # "nomask": no ground_truth folder
            assert not test.has_mask[i] and not test.masks[i].any()
    mo = test.mask_or_none()
    assert [m is None for m in mo] == [not h for h in test.has_mask]


def test_rgb_pixels_match_the_files(tree, splits):
    test = splits[("widget", "test")]
    i = test.file_names.index("test/good/000.png")
    with Image.open(tree / "widget" / "test/good/000.png") as im:
        np.testing.assert_array_equal(test.images[i], np.asarray(im))


def test_mvtec_builder_from_folder_and_from_archive(tree, tmp_path):
    # the mvtec_ad builder pointed at the fake tree ("grid" is an MVTec AD category name)
    a = load_split("mvtec_ad", "grid", "test", str(tmp_path / "t1"), source_dir=str(tree), progress=False)
    # ... and at a .tar.xz with the archive's layout (category folders at the top)
    arch = tmp_path / "mvtec_anomaly_detection.tar.xz"
    with tarfile.open(arch, "w:xz") as tar:
        tar.add(tree / "grid", arcname="grid")
    b = load_split("mvtec_ad", "grid", "test", str(tmp_path / "t2"), source_dir=str(arch), progress=False)
    assert a.ids == b.ids and a.file_names == b.file_names
    for x, y in zip(a.images, b.images):
        np.testing.assert_array_equal(x, y)
    assert a.images[0].shape[-1] == 1
    # prepared: later runs need no download; the extracted copy is gone
    c = load_split("mvtec_ad", "grid", "train", str(tmp_path / "t2"), progress=False)
    assert len(c.ids) == 6
    assert not any((tmp_path / "t2" / "downloads").rglob("*.png"))
    assert "tensorflow" not in sys.modules


def test_mvtec_builder_without_download_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="--manual-dir"):
        load_split("mvtec_ad", "carpet", "train", str(tmp_path / "t"), progress=False)
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"expected .*wrong/carpet/train/good.*readme\.txt"):
        load_split("mvtec_ad", "carpet", "train", str(tmp_path / "t"), source_dir=str(tmp_path / "wrong"),
                   progress=False)


# --------------------------------------------------------------------------- errors, each with its message


def _broken(tmp_path, name="cat"):
    root = tmp_path / "src"
    fake_tree.make_category(root, name, channels=3, size_hw=(40, 48), n_train=2, n_good=1, n_defect=2)
    return root


def _load(root, tmp_path, name="cat"):
    return load_split("folder", name, "train", str(tmp_path / "tfds"), source_dir=str(root), progress=False)


def test_error_missing_train_good(tmp_path):
    root = _broken(tmp_path)
    shutil.rmtree(root / "cat" / "train" / "good")
    with pytest.raises(DataError, match=r"expected normal training images in .*cat/train/good"):
        _load(root, tmp_path)


def test_error_defect_without_its_mask(tmp_path):
    root = _broken(tmp_path)
    (root / "cat" / "ground_truth" / "blob" / "001_mask.png").unlink()
    with pytest.raises(DataError, match=r"test/blob/001\.png has no mask: expected .*ground_truth/blob/001_mask\.png"):
        _load(root, tmp_path)


def test_error_mask_size_differs(tmp_path):
    root = _broken(tmp_path)
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(root / "cat" / "ground_truth" / "blob" / "000_mask.png")
    with pytest.raises(DataError, match=r"000_mask\.png is 12x10 .* image .*blob/000\.png is 48x40"):
        _load(root, tmp_path)


def test_error_unreadable_image_is_named(tmp_path):
    root = _broken(tmp_path)
    (root / "cat" / "test" / "blob" / "001.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*cat/test/blob/001\.png"):
        _load(root, tmp_path)


def test_error_empty_category(tmp_path):
    root = tmp_path / "src"
    (root / "cat" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty category 'cat'.*train/good"):
        _load(root, tmp_path)
    fake_tree.make_category(root, "cat2", channels=1, size_hw=(40, 48), n_train=2, n_good=0, n_defect=0)
    with pytest.raises(DataError, match=r"empty category 'cat2': no test images"):
        _load(root, tmp_path, "cat2")


def test_a_photo_with_an_exif_orientation_is_read_as_shown_and_matches_its_mask(tmp_path):
    """A photo stored sideways with EXIF orientation 6 (turn 90 degrees clockwise to show) is read
    upright, as viewers show it and as its mask was drawn; a file without the tag is read as stored."""
    from iepjax.data.layout import Entry, load_entry, read_image
    raw = np.arange(40 * 48, dtype=np.uint32).reshape(40, 48) % 251
    raw = raw.astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(raw).save(tmp_path / "side.png", exif=exif)
    Image.fromarray(raw).save(tmp_path / "plain.png")
    np.testing.assert_array_equal(read_image(tmp_path / "side.png")[..., 0], np.rot90(raw, -1))
    np.testing.assert_array_equal(read_image(tmp_path / "plain.png")[..., 0], raw)
    mask = np.zeros((48, 40), np.uint8)  # drawn on the upright image: 48 rows, 40 columns
    mask[5:9, 30:35] = 255
    Image.fromarray(mask).save(tmp_path / "side_mask.png")
    rec = load_entry(Entry("test", "spot", "spot/side", tmp_path / "side.png", tmp_path / "side_mask.png", True,
                           "test/spot/side.png"), channels=1)
    with Image.open(io.BytesIO(rec["image"])) as im:
        assert im.size == (40, 48)  # (W, H) upright


def test_a_new_reader_prepares_folders_again(tmp_path, monkeypatch):
    """The reader's version is part of a folder's fingerprint: data prepared by an older reader
    (sideways photos, before EXIF orientation) is not reused."""
    from iepjax.data import layout
    fake_tree.make_category(tmp_path, "cat", channels=1, size_hw=(40, 48), n_train=2, n_good=1, n_defect=1)
    now = layout.fingerprint(tmp_path, "cat")
    assert layout.fingerprint(tmp_path, "cat") == now
    monkeypatch.setattr(layout, "READER_VERSION", layout.READER_VERSION - 1)
    assert layout.fingerprint(tmp_path, "cat") != now


def test_error_unknown_category_lists_the_folder(tmp_path):
    root = _broken(tmp_path)
    with pytest.raises(DataError, match=r"expected the category folder .*nope.*holds: cat/"):
        _load(root, tmp_path, "nope")


def test_changed_folder_is_prepared_again(tmp_path):
    root = _broken(tmp_path)
    assert len(_load(root, tmp_path).ids) == 2
    Image.fromarray(np.full((40, 48, 3), 99, np.uint8)).save(root / "cat" / "train" / "good" / "new.png")
    assert len(_load(root, tmp_path).ids) == 3


# --------------------------------------------------------------------------- preprocessing and protocol


def test_tiles_cover_and_stitch_back():
    assert tile_positions(64, 80, 32, 32) == [(0, 0), (0, 32), (0, 48), (32, 0), (32, 32), (32, 48)]
    prep = Preprocess(kind="texture", size=32, texture_fov=0.5)  # short side -> 64 px
    img = np.random.default_rng(0).integers(0, 255, (100, 130, 3), dtype=np.uint8)
    inputs, lay = model_inputs([img], prep)
    assert lay[0].work_hw == (64, 83) and inputs.shape == (len(lay[0].positions), 32, 32, 3)
    back = stitch(inputs.astype(np.float32), lay[0])
    from iepjax.data.preprocess import resize_to
    np.testing.assert_allclose(back, resize_to(img, (64, 83)).astype(np.float32))
    obj, lay_o = model_inputs([img], Preprocess(kind="object", size=32))
    assert obj.shape == (1, 32, 32, 3) and lay_o[0].orig_hw == (100, 130)


def test_stitch_blends_overlaps_by_distance_from_the_tile_border():
    from iepjax.data.preprocess import ImageLayout, tile_weights
    # two 8 px tiles over a 12 px row band: columns 4..7 are covered by both
    lay = ImageLayout((8, 12), (8, 12), [(0, 0), (0, 4)], 0)
    tiles = np.stack([np.full((8, 8), 1.0, np.float32), np.full((8, 8), 3.0, np.float32)])
    out = stitch(tiles, lay)
    np.testing.assert_array_equal(out[:, :4], 1.0)  # one tile only: its value exactly
    np.testing.assert_array_equal(out[:, 8:], 3.0)
    # column 4 is tile 0's column 4 (ramp 3.5) and tile 1's border column 0 (ramp 0.5)
    np.testing.assert_allclose(out[3, 4], (3.5 * 1 + 0.5 * 3) / 4.0, rtol=1e-6)
    np.testing.assert_allclose(out[3, 7], (0.5 * 1 + 3.5 * 3) / 4.0, rtol=1e-6)
    assert np.all(np.diff(out[3]) >= 0)  # a smooth ramp from one tile to the other
    w = tile_weights(8)
    assert w.shape == (8, 8) and w[0, 0] == 0.25 and w[3, 4] == w.max() == 3.5 ** 2
    # non-overlapping tiles of any values stitch back bit for bit
    rnd = np.random.default_rng(1).random((2, 8, 8), dtype=np.float32)
    back = stitch(rnd, ImageLayout((8, 16), (8, 16), [(0, 0), (0, 8)], 0))
    np.testing.assert_array_equal(back, np.concatenate(list(rnd), axis=1))


def test_an_own_folder_trained_as_objects_by_default_is_told_how_to_train_a_texture():
    from iepjax.presets import kind_note
    note = kind_note("folder", "widget", None)
    assert "widget" in note and "--kind texture" in note and "128 px" in note
    assert kind_note("folder", "widget", "object") is None and kind_note("folder", "widget", "texture") is None
    assert kind_note("folder", "carpet", None) is None  # an MVTec AD name: its own row
    assert kind_note("textures", "brick", None) is None


def test_tile_stride_from_the_preset_or_a_flag():
    from iepjax.presets import preprocess
    assert preprocess("textures", "brick").tile_stride == 32  # half of the 64 px model input
    assert preprocess("textures", "brick", size=128).tile_stride == 64  # a fraction of the size
    assert preprocess("textures", "brick", tile_stride=64).tile_stride == 0  # = size: no overlap
    assert preprocess("textures", "brick", tile_stride=16).stride == 16
    assert Preprocess(kind="texture", size=64, tile_stride=64) == Preprocess(kind="texture", size=64)


def test_rows_without_a_tile_step_overlap_tiles_where_images_are_small():
    """MVTec AD and own-folder rows leave the tile stride to the training images' size: half a tile
    where an image then takes at most MAX_TILES tiles (an own folder's 128 px crops at 64 px: 9, as
    on the built-in textures), none where it would take more (an MVTec AD texture's 1024 px photo at
    its 512 px working scale: 49) and for objects. A stride given is kept; unresolved means none."""
    from iepjax.data.preprocess import AUTO_STRIDE, MAX_TILES
    from iepjax.presets import preprocess

    def resolved(prep, shape):
        return prep.with_pixel_scale([shape]).with_tile_stride([shape, shape])

    carpet = preprocess("mvtec_ad", "carpet")
    assert carpet.tile_stride == AUTO_STRIDE and carpet.stride == carpet.size  # unresolved: no overlap
    assert resolved(carpet, (1024, 1024)).tile_stride == 0  # 512 px working image: 16 tiles, 49 if overlapped
    own = preprocess("folder", "moon", size=64, kind="texture")
    assert resolved(own, (128, 128)).tile_stride == 32  # 9 tiles, as brick's crops
    big = resolved(own, (256, 256))  # 49 tiles overlapped
    assert big.tile_stride == 0 and len(tile_positions(256, 256, 64, 32)) > MAX_TILES
    assert resolved(preprocess("folder", "widget"), (900, 700)).tile_stride == 0  # an object: one input
    assert resolved(preprocess("folder", "moon", kind="texture", size=64, tile_stride=48), (128, 128)).stride == 48
    assert preprocess("textures", "brick").with_tile_stride([]).tile_stride == 32  # the preset's own
    with pytest.raises(ValueError, match="tile_stride=-2"):
        Preprocess(kind="texture", size=64, tile_stride=-2)


def test_patch_bank_is_deterministic_and_lazy():
    ims = [np.random.default_rng(i).integers(0, 255, (70, 90, 1), dtype=np.uint8) for i in range(2)]
    bank = PatchBank(ims, 32, 10000, seed=3)
    assert len(bank) == 10000 and bank.shape == (10000, 32, 32, 1)
    a, b = bank[np.array([5, 9999, 5])], PatchBank(ims, 32, 10000, seed=3)[np.array([5, 9999, 5])]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[0], a[2])
    assert bank[:4].shape == (4, 32, 32, 1)


def test_official_metrics_skip_images_without_masks_and_tiffs(tmp_path, splits):
    test = splits[("grid", "test")]
    maps = {r: [m.astype(np.float32) + 0.01 * np.random.default_rng(0).random(m.shape) for m in test.masks]
            for r in scoring.ROWS}
    out = scoring.official_metrics(maps, test)
    assert out["grad"]["pixel_auroc"] > 0.99 and out["grad"]["pixel_aupro"] > 0.99
    assert sorted(out["protocol"]["skipped_pixel_metrics"]) == ["nomask/000", "nomask/001"]
    assert "nomask" in out["protocol"]["note"]
    # per defect kind: the good images with that kind's, each kind against metrics.evaluate on the subset
    from iepjax import metrics
    kinds = sorted({k for k, y in zip(test.defect_types, test.labels) if y == 1})
    assert sorted(out["per_kind"]) == kinds and len(kinds) >= 2
    masks = test.mask_or_none()
    for kind in kinds:
        idx = [i for i, k in enumerate(test.defect_types) if k in ("good", kind)]
        assert out["per_kind"][kind]["n_images"] == sum(k == kind for k in test.defect_types)
        want = metrics.evaluate([maps["grad"][i] for i in idx], [masks[i] for i in idx], np.asarray(test.labels)[idx])
        for m, v in want.items():
            assert out["per_kind"][kind]["grad"][m] == pytest.approx(v, nan_ok=True), (kind, m)
    paths = outputs.write_tiffs(tmp_path, "grid", test.ids, maps["grad"])
    import tifffile
    for p, id_, m in zip(paths, test.ids, maps["grad"]):
        assert p == tmp_path / "grid" / "test" / id_.split("/")[0] / (id_.split("/")[1] + ".tiff")
        t = tifffile.imread(p)
        assert t.dtype == np.float32 and t.shape == m.shape


def test_own_folders_never_upsample_textures(tmp_path):
    """An own folder's texture is worked on at its resolution or below (a 128 px photo is not blown
    up to the MVTec AD working scale of size / 0.25); --texture-fov sets the scale; the choice is
    recorded in preprocess.json."""
    from iepjax import presets
    own = presets.preprocess("folder", "widget", size=64, kind="texture")
    assert (own.texture_fov, own.upsample) == (0.25, False)
    assert own.working_shape(128, 160) == (128, 160)  # size / 0.25 = 256 would upsample 2x
    assert own.working_shape(1024, 1024) == (256, 256)  # large photos are still brought down to the scale
    assert presets.preprocess("folder", "widget", size=64, kind="texture", texture_fov=0.5).working_shape(512, 512) == (128, 128)
    mvtec = presets.preprocess("mvtec_ad", "carpet", size=64)
    assert mvtec.upsample and mvtec.working_shape(128, 128) == (256, 256)
    own.save(tmp_path)
    assert Preprocess.load(tmp_path) == own and '"upsample": false' in (tmp_path / "preprocess.json").read_text()


def test_a_run_keeps_one_pixel_scale_for_images_of_every_size(tmp_path):
    """A trained texture run fixes its working scale from its training images (the median short
    side brought to size / texture_fov): an image of half their size is worked on at half the size
    (the texture keeps its size in pixels), where each image's own scale would blow it up 2x; for
    images of the training size nothing changes; objects are resized as before."""
    prep = Preprocess(kind="texture", size=32, texture_fov=0.25)  # 128 px working short side
    run = prep.with_pixel_scale([(256, 256), (256, 300), (240, 256), (512, 512)])  # median short side 256
    assert run.pixel_scale == 0.5 and run.with_pixel_scale([(64, 64)]) == run  # fixed once
    assert run.working_shape(256, 300) == prep.working_shape(256, 300) == (128, 150)
    assert prep.working_shape(128, 128) == (128, 128) and run.working_shape(128, 128) == (64, 64)
    assert run.working_shape(40, 40) == (32, 32)  # never below one model input
    own = Preprocess(kind="texture", size=32, texture_fov=0.25, upsample=False).with_pixel_scale([(100, 100)])
    assert own.pixel_scale == 1.0 and own.working_shape(300, 200) == (300, 200)  # own photos: never upsampled
    obj = Preprocess(kind="object", size=32)
    assert obj.with_pixel_scale([(256, 256)]) == obj and prep.with_pixel_scale([]) == prep
    run.save(tmp_path)
    assert Preprocess.load(tmp_path) == run
    with pytest.raises(ValueError, match="pixel_scale"):
        Preprocess(kind="texture", size=32, pixel_scale=-1.0)
    # a run stored before the scale was fixed is resumed when its images share one size (the same crops)
    from iepjax.pipelines.train import _same_training_inputs
    assert _same_training_inputs(prep, prep.with_pixel_scale([(256, 256)] * 3), [(256, 256)] * 3)
    assert not _same_training_inputs(prep, run, [(256, 256), (256, 300), (240, 256), (512, 512)])


def test_the_rough_texture_folder_is_a_valid_category(tmp_path):
    """tools/rough_folder.py (the collapse check on a full-size own folder, docs/calibration.md) writes a
    category the folder layout accepts: 120 normal training crops, 8 good and 8 masked defect test crops."""
    from iepjax.data.layout import scan_category
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    try:
        import rough_folder
    finally:
        sys.path.pop(0)
    rough_folder.write_folder(tmp_path, sigma=1.5)
    entries = scan_category(tmp_path, "noise")
    train = [e for e in entries if e.split == "train"]
    spots = [e for e in entries if e.split == "test" and e.defect_type == "spot"]
    assert len(train) == 120 and len(entries) == 136 and len(spots) == 8
    assert all(e.mask_path is not None for e in spots)
    with Image.open(spots[0].mask_path) as m:
        assert m.size == (128, 128) and np.asarray(m).max() == 255
    # training crops larger than the test crops (the one-pixel-scale check, docs/calibration.md)
    rough_folder.write_folder(tmp_path / "sizes", sigma=3.0, train_size=256, test_size=192)
    sized = scan_category(tmp_path / "sizes", "noise")
    with Image.open(sized[0].path) as a, Image.open([e for e in sized if e.split == "test"][0].path) as b:
        assert (a.size, b.size) == ((256, 256), (192, 192))


def test_the_photo_folder_is_a_valid_category_split_by_columns(tmp_path):
    """tools/photo_folder.py (the own-folder transfer check, docs/results.md) cuts a category from one
    photo: training crops from its left part, test crops from its right part (no shared pixel),
    each defect drawn inside its exact mask and nowhere else, deterministic in its seed."""
    from iepjax.data.layout import read_image, read_mask, scan_category
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    try:
        import photo_folder
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (48, 160, 3)).astype(np.uint8)
    photo_folder.write_folder(photo, tmp_path, "cols", kinds=("spot", "blur"), crop=32, train=10,
                              good=3, per_kind=2, train_fraction=0.5, seed=3)
    entries = scan_category(tmp_path, "cols")
    counts = {}
    for e in entries:
        counts[e.split, e.defect_type] = counts.get((e.split, e.defect_type), 0) + 1
    assert counts == {("train", "good"): 10, ("test", "good"): 3, ("test", "spot"): 2, ("test", "blur"): 2}

    def origins(img, keep):
        """Every (row, col) where the photo's crop equals `img` on the pixels `keep`."""
        return [(r, c) for r in range(48 - 31) for c in range(160 - 31)
                if np.array_equal(photo[r:r + 32, c:c + 32][keep], img[keep])]

    for e in entries:
        img = read_image(e.path)
        assert img.shape == (32, 32, 3), e.path
        mask = read_mask(e.mask_path) if e.mask_path is not None else np.zeros((32, 32), bool)
        assert mask.any() == (e.defect_type != "good"), e.path
        (r, c), = origins(img, ~mask)  # outside its mask, each crop is the photo, at one place
        assert (c + 32 <= 80) if e.split == "train" else (c >= 80), e.path  # no shared pixel
        if mask.any():  # the defect is drawn inside its mask
            assert (img[mask] != photo[r:r + 32, c:c + 32][mask]).any(), e.path
    again = tmp_path / "again"
    photo_folder.write_folder(photo, again, "cols", kinds=("spot", "blur"), crop=32, train=10,
                              good=3, per_kind=2, train_fraction=0.5, seed=3)
    for e in entries:
        assert (again / e.path.relative_to(tmp_path)).read_bytes() == e.path.read_bytes()
    gray = photo_folder.write_folder(photo[..., 0], tmp_path / "gray", "g", kinds=("scratch",), crop=32,
                                     train=2, good=1, per_kind=1, train_fraction=0.5)
    assert {read_image(p).shape for p in gray.rglob("*.png")} == {(32, 32, 1)}
    with pytest.raises(ValueError, match="cannot hold"):
        photo_folder.write_folder(photo, tmp_path / "x", "c", crop=96)
    assert photo_folder.main(["--photo", str(tmp_path / "none.png"), "--out", str(tmp_path), "--category", "c"]) == 2
    Image.fromarray(photo).save(tmp_path / "photo.png")
    cli = ["--photo", str(tmp_path / "photo.png"), "--out", str(tmp_path / "cli"), "--category", "c", "--crop", "16",
           "--train", "1", "--good", "1", "--per-kind", "1", "--kinds", "spot"]
    assert photo_folder.main(cli + ["--area", "0", "48", "100", "170"]) == 2  # outside the 48x160 photo
    assert photo_folder.main(cli + ["--area", "8", "40", "100", "160"]) == 0
    (train,) = (tmp_path / "cli/c/train/good").glob("*.png")
    img = read_image(train)
    assert img.shape == (16, 16, 3) and any(np.array_equal(photo[8 + r:24 + r, 100 + c:116 + c], img)
                                            for r in range(17) for c in range(60 - 15))


# --------------------------------------------------------------------------- high-depth images


def test_high_depth_gray_images_are_read_through_a_window(tmp_path):
    """16-bit PNG, 32-bit integer and float TIFF: lo -> 0, hi -> 255, linear, rounded and clipped;
    as one or three channels; without a window, or with NaN values, refused naming the file; a
    16-bit mask is a mask."""
    from iepjax.data.layout import intensity_window, read_image, read_mask
    v = np.array([[1000, 1500, 2000], [2500, 3000, 4000]], np.float64)
    Image.fromarray(v.astype(np.uint16)).save(tmp_path / "a.png")
    Image.fromarray(v.astype(np.int32)).save(tmp_path / "b.tif")
    Image.fromarray((v / 4096).astype(np.float32)).save(tmp_path / "c.tif")
    want = np.array([[0, 64, 128], [191, 255, 255]], np.uint8)  # window (1000, 3000): 255 (v - 1000) / 2000
    for name, window in (("a.png", (1000, 3000)), ("b.tif", (1000, 3000)), ("c.tif", (1000 / 4096, 3000 / 4096))):
        np.testing.assert_array_equal(read_image(tmp_path / name, window=window)[..., 0], want)
        assert read_image(tmp_path / name, 3, window).shape == (2, 3, 3)
        with pytest.raises(DataError, match=rf"{name}.* more than 8 bits per pixel"):
            read_image(tmp_path / name)
    lo, hi = intensity_window([tmp_path / "a.png", tmp_path / "b.tif"])
    assert (lo, hi) == pytest.approx(tuple(np.quantile(np.concatenate([v.ravel(), v.ravel()]), (1e-4, 1 - 1e-4))))
    Image.fromarray(np.full((2, 3), 99, np.uint8)).save(tmp_path / "eight.png")
    assert intensity_window([tmp_path / "eight.png"]) is None  # 8-bit images need no window
    with pytest.raises(DataError, match=r"eight\.png has 8 bits per pixel, but its category's training images"):
        read_image(tmp_path / "eight.png", window=(1000, 3000))  # one bit depth per category
    Image.fromarray(np.array([[0.1, np.nan]], np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(DataError, match=r"nan\.tif has NaN"):
        read_image(tmp_path / "nan.tif", window=(0, 1))
    Image.fromarray(np.array([[0, 65535], [0, 0]], np.uint16)).save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), [[False, True], [False, False]])


def _png_rgb16(path, rgb_HxWx3: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot write one)."""
    import struct
    import zlib

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    h, w, _ = rgb_HxWx3.shape
    a = rgb_HxWx3.astype(">u2")
    rows = b"".join(b"\x00" + a[i].tobytes() for i in range(h))
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_a_colour_image_of_16_bits_per_channel_is_refused_not_cut_to_its_high_byte(tmp_path):
    """Pillow reads a 48-bit RGB PNG as 8-bit RGB by keeping each value's high byte: 12-bit data would
    become an almost black image without a word. It is refused, naming the file."""
    from PIL import Image as PILImage

    from iepjax.data.layout import read_image
    _png_rgb16(tmp_path / "c.png", np.full((4, 5, 3), 3000))
    with PILImage.open(tmp_path / "c.png") as im:
        assert im.mode == "RGB"  # what Pillow makes of it
    with pytest.raises(DataError, match=r"c\.png is a colour image of 16 bits per channel"):
        read_image(tmp_path / "c.png")


def test_a_high_depth_test_image_in_an_8_bit_category_is_named(tmp_path):
    root = _broken(tmp_path)  # 8-bit RGB training images: no window
    (root / "cat" / "test" / "blob" / "001.png").unlink()
    Image.fromarray(np.full((40, 48), 3000, np.uint16)).save(root / "cat" / "test" / "blob" / "001.png")
    with pytest.raises(DataError, match=r"cat/test/blob/001\.png has more than 8 bits per pixel"):
        load_split("folder", "cat", "test", str(tmp_path / "tfds"), source_dir=str(root), progress=False)


def test_the_intensity_window_is_recorded_with_the_run_and_the_export():
    """Preprocess keeps the window as a (hashable) tuple through preprocess.json and an export's
    metadata; 8-bit runs' preprocess.json (and the threshold keys made of it) have no such key."""
    from types import SimpleNamespace

    from iepjax.export import preprocessing_metadata
    from iepjax.predictor import Predictor, preprocess_from_metadata
    prep = Preprocess(kind="texture", size=32, pixel_scale=0.5, intensity_window=[995, 2828.5])
    assert prep.intensity_window == (995.0, 2828.5) and hash(prep)
    assert Preprocess(**prep.to_dict()) == prep
    assert "intensity_window" not in Preprocess(kind="texture", size=32).to_dict()
    assert preprocess_from_metadata(preprocessing_metadata(prep, 1)) == prep
    with pytest.raises(ValueError, match="intensity_window"):
        Preprocess(intensity_window=(5, 5))
    as_model = Predictor._as_model_channels  # the predictor's in-memory arrays: values mapped as files are
    deep = np.array([[995, 2828.5, 4000]], np.float64)
    got = as_model(SimpleNamespace(prep=prep, channels=1), deep.astype(np.uint16))
    np.testing.assert_array_equal(got[..., 0], [[0, 255, 255]])
    with pytest.raises(TypeError, match="expected uint8"):
        as_model(SimpleNamespace(prep=Preprocess(), channels=1), deep.astype(np.uint16))
    with pytest.raises(TypeError, match="trained on high-depth images"):
        as_model(SimpleNamespace(prep=prep, channels=1), np.zeros((2, 3), np.uint8))
