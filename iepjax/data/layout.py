"""The MVTec AD folder layout without TensorFlow Datasets: scanning, checking and reading image files.

Used by the TFDS builders of mvtec.py and by plain-folder inference; imports no TFDS.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import sys
import tarfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

MVTEC_CATEGORIES = ("carpet", "grid", "leather", "tile", "wood", "bottle", "cable", "capsule", "hazelnut",
                    "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper")
TEXTURE_CATEGORIES = ("carpet", "grid", "leather", "tile", "wood")
GRAY_CATEGORIES = ("grid", "screw", "zipper")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "test")
ARCHIVE_NAME = "mvtec_anomaly_detection.tar.xz"
HOMEPAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
MVTec AD must be downloaded by hand (licence CC BY-NC-SA 4.0: non-commercial use only):
fill in the form at {HOMEPAGE}, download {ARCHIVE_NAME} (4.9 GB), and either extract it or
leave it packed. Then point at it: `python train.py --dataset mvtec_ad --category carpet
--manual-dir PATH`, where PATH is the extracted folder (the one holding carpet/, grid/, ...),
or the .tar.xz itself. Each category is prepared once; later runs need no PATH.
"""


class DataError(ValueError):
    """A dataset folder that does not have the expected layout or content (the message says which)."""


class Entry(NamedTuple):
    """One image of a category folder, before reading."""

    split: str  # "train" | "test"
    defect_type: str  # "good" or the defect kind
    id: str  # "<defect_type>/<stem>"
    path: Path
    mask_path: Path | None  # None: good image, or a kind without masks
    has_mask: bool  # False only for defect images of a kind without masks
    file_name: str  # path relative to the category folder


# --------------------------------------------------------------------------- scanning


def _images_in(folder: Path) -> list[Path]:
    """Image files directly in `folder` (by extension, case-insensitive), sorted; hidden files skipped."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursively, by extension), sorted; hidden files and folders skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"input folder {folder} does not exist or is not a folder")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _listing(folder: Path, limit: int = 12) -> str:
    """A short description of what `folder` holds, for error messages."""
    if not folder.exists():
        return f"{folder} does not exist"
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return f"{folder} is empty"
    more = f" ... ({len(names) - limit} more)" if len(names) > limit else ""
    return f"{folder} holds: {', '.join(names[:limit])}{more}"


def _unique_stems(paths: list[Path], folder: Path) -> None:
    stems: dict[str, Path] = {}
    for p in paths:
        if p.stem in stems:
            raise DataError(f"two images with the same name in {folder}: {stems[p.stem].name} and {p.name}")
        stems[p.stem] = p


def _find_mask(gt_dir: Path, stem: str) -> Path | None:
    for suffix in ("_mask", ""):
        for ext in IMAGE_EXTENSIONS:
            for e in (ext, ext.upper()):
                cand = gt_dir / f"{stem}{suffix}{e}"
                if cand.is_file():
                    return cand
    return None


def scan_category(root: str | os.PathLike, category: str) -> list[Entry]:
    """All images of `root/category` with their masks, checked for layout (not read yet).

    Raises DataError naming the expected path and what was found when the category folder,
    train/good or the test images are missing, or when a defect image has no mask although
    masks exist for its kind.
    """
    root = Path(root)
    cat = root / category
    if not cat.is_dir():
        raise DataError(f"expected the category folder {cat} (layout <root>/<category>/train/good/*.png); "
                        f"{_listing(root)}")
    train_good = cat / "train" / "good"
    if not train_good.is_dir():
        raise DataError(f"expected normal training images in {train_good}, but that folder is missing; "
                        f"{_listing(cat / 'train' if (cat / 'train').is_dir() else cat)}")
    train = _images_in(train_good)
    if not train:
        raise DataError(f"empty category {category!r}: no images (.png/.jpg/.bmp/.tif) in {train_good}; "
                        f"{_listing(train_good)}")
    _unique_stems(train, train_good)
    entries = [Entry("train", "good", f"good/{p.stem}", p, None, True, p.relative_to(cat).as_posix())
               for p in train]

    test_dir = cat / "test"
    kinds = sorted(p.name for p in test_dir.iterdir() if p.is_dir()) if test_dir.is_dir() else []
    n_test = 0
    for kind in kinds:
        images = _images_in(test_dir / kind)
        _unique_stems(images, test_dir / kind)
        n_test += len(images)
        gt_dir = cat / "ground_truth" / kind
        kind_has_masks = kind != "good" and bool(_images_in(gt_dir))
        for p in images:
            mask = None
            if kind_has_masks:
                mask = _find_mask(gt_dir, p.stem)
                if mask is None:
                    raise DataError(f"defect image {p} has no mask: expected {gt_dir / (p.stem + '_mask.png')} "
                                    f"(the folder holds masks for other {kind!r} images)")
            entries.append(Entry("test", kind, f"{kind}/{p.stem}", p, mask, kind == "good" or kind_has_masks,
                                 p.relative_to(cat).as_posix()))
    if n_test == 0:
        raise DataError(f"empty category {category!r}: no test images in {test_dir}/<kind>/ "
                        f"(expected test/good/ and test/<defect>/); {_listing(test_dir if test_dir.is_dir() else cat)}")
    return entries


def kinds_without_masks(entries: list[Entry]) -> list[str]:
    """Defect kinds whose images have no ground-truth masks."""
    return sorted({e.defect_type for e in entries if not e.has_mask})


# --------------------------------------------------------------------------- reading


# Pillow's modes of gray images with more than 8 bits per pixel (16-bit scans and cameras, 32-bit
# integers, 32-bit floats): read through a category's intensity window (`intensity_window`).
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# The window's ends: these quantiles of the training images' values, so that a few hot or dead pixels
# do not set the scale, and no more than 0.01 % of normal pixels are clipped at either end.
WINDOW_QUANTILES = (1e-4, 1.0 - 1e-4)
_WINDOW_SAMPLES = 1 << 24  # values drawn for the quantiles, spread evenly over the images


def read_image(path: str | os.PathLike, channels: int | None = None,
               window: tuple[float, float] | None = None) -> np.ndarray:
    """An image file as uint8 (H, W, C); C = `channels` (1 gray, 3 RGB) or the file's own (1 or 3).

    Palette and alpha are dropped. A gray image of more than 8 bits (16-bit, 32-bit integer or
    float; `HIGH_DEPTH_MODES`) is mapped to 8 bits by `window` = (lo, hi), its category's
    intensity window (`intensity_window`): lo -> 0, hi -> 255, linear, clipped; without a window
    it is refused, and so is an 8-bit image given a window (a category has one bit depth).
    DataError names the file. An EXIF orientation (phone and some camera photos) is
    applied, so the array is the image as viewers (and OpenCV) show it, the orientation a mask
    drawn on it has.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            if _colour_of_16_bits(im):  # Pillow would keep each value's high byte only, silently
                raise DataError(f"image {path} is a colour image of 16 bits per channel, which is not supported: "
                                "convert it to 8-bit colour, or to 16-bit gray")
            im.load()
            im = _upright(im)
            mode = im.mode
            if mode in HIGH_DEPTH_MODES:
                arr = to_uint8(_values(im, path), window, path)
                if (channels or 1) == 3:
                    arr = np.repeat(arr[..., None], 3, axis=-1)
            elif window is not None:  # one depth per category: an 8-bit value is not a value of the window's scale
                raise DataError(f"image {path} has 8 bits per pixel, but its category's training images have more "
                                "(they are read through an intensity window, docs/datasets.md): give it in the "
                                "training images' bit depth")
            else:
                own = 1 if mode in ("1", "L", "LA") or (mode == "P" and _palette_is_gray(im)) else 3
                want = channels or own
                im = im.convert("L" if want == 1 else "RGB")
                arr = np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e
    return arr[..., None] if arr.ndim == 2 else arr


def _colour_of_16_bits(im) -> bool:
    """Whether an opened (not yet loaded) image stores colour with 16 bits per channel (its decoder's raw mode)."""
    return im.mode not in HIGH_DEPTH_MODES and any(
        isinstance(t.args, str) and ";16" in t.args for t in (getattr(im, "tile", None) or []))


def _values(im, path: Path) -> np.ndarray:
    """The pixel values of a high-depth gray image as float64 (H, W); DataError if any is not finite."""
    v = np.asarray(im).astype(np.float64)
    if v.ndim != 2:
        raise DataError(f"image {path} ({im.mode}) did not read as one gray channel (shape {v.shape})")
    if not np.isfinite(v).all():
        raise DataError(f"image {path} has NaN or infinite pixel values")
    return v


def to_uint8(values_HxW: np.ndarray, window: tuple[float, float] | None, path: str | os.PathLike = "") -> np.ndarray:
    """High-depth values (H, W) -> uint8 (H, W) through `window` = (lo, hi): round(255 (v - lo) / (hi - lo)),
    clipped to [0, 255]. DataError (naming `path`) without a window."""
    if window is None:
        raise DataError(f"image {path} has more than 8 bits per pixel and no intensity window to read it through: "
                        "a model reads high-depth images through the window of its training images, and this "
                        "model's (or this category's) were 8-bit (docs/datasets.md); convert the image to 8 bits, "
                        "or train on high-depth images")
    lo, hi = float(window[0]), float(window[1])
    out = np.rint((np.asarray(values_HxW, np.float64) - lo) * (255.0 / (hi - lo)))
    return np.clip(out, 0, 255).astype(np.uint8)


def intensity_window(paths: list[Path]) -> tuple[float, float] | None:
    """(lo, hi): the `WINDOW_QUANTILES` of the pixel values of the high-depth images among `paths`
    (a category's normal training images), the window through which every high-depth image of the
    category is read (`read_image`); None when none of them is high-depth (8-bit images need none).

    The window is fixed per category, never per image, so a defect's intensity is compared with
    the normal images' on one scale; hi > lo always (a constant image gets a window of width 1).
    """
    high = [p for p in paths if image_mode(p) in HIGH_DEPTH_MODES]
    if not high:
        return None
    per_image = max(1, _WINDOW_SAMPLES // len(high))
    samples = []
    for p in high:
        v = _high_depth_values(p).ravel()
        samples.append(v[::max(1, -(-v.size // per_image))])
    lo, hi = (float(q) for q in np.quantile(np.concatenate(samples), WINDOW_QUANTILES))
    return lo, (hi if hi > lo else lo + 1.0)


def _high_depth_values(path: str | os.PathLike) -> np.ndarray | None:
    """The values (H, W) float64 of a high-depth gray image file, upright; None for any other image.
    DataError names a file that cannot be read."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            if im.mode not in HIGH_DEPTH_MODES:
                return None
            im.load()
            return _values(_upright(im), Path(path))
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def _upright(im):
    """`im` turned and flipped as its EXIF orientation tag says (unchanged without one)."""
    from PIL import ImageOps
    try:
        if im.getexif().get(0x0112, 1) in (None, 1):  # 0x0112: Orientation; 1 = as stored
            return im
        return ImageOps.exif_transpose(im)
    except Exception:  # unreadable metadata: the pixels, as stored, are still the image
        return im


def _palette_is_gray(im) -> bool:
    pal = im.getpalette()
    if not pal:
        return True
    p = np.asarray(pal, dtype=np.int32).reshape(-1, 3)
    return bool(np.all(p[:, 0] == p[:, 1]) and np.all(p[:, 1] == p[:, 2]))


def image_mode(path: str | os.PathLike) -> str:
    """Pillow's mode of an image file ("L", "RGB", "I;16", ...), from its header (cheap). DataError if unreadable."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return im.mode
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def image_channels(path: Path) -> int:
    """1 or 3: the channel count of an image file, from its header (cheap). DataError if unreadable."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            if im.mode in ("1", "L", "LA") + HIGH_DEPTH_MODES:
                return 1
            if im.mode == "P":
                return 1 if _palette_is_gray(im) else 3
            return 3
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask file as bool (H, W): nonzero = defect (8-bit or high-depth files alike)."""
    values = _high_depth_values(path)
    return values > 0 if values is not None else read_image(path, channels=1)[..., 0] > 0


def _png_bytes(arr_HxWxC: np.ndarray) -> bytes:
    from PIL import Image
    a = arr_HxWxC[..., 0] if arr_HxWxC.shape[-1] == 1 else arr_HxWxC
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def load_entry(entry: Entry, channels: int, window: tuple[float, float] | None = None) -> dict[str, object]:
    """Read one entry into a record (image and mask as PNG bytes); checks that mask and image sizes agree.
    `window`: the category's intensity window for high-depth images (`intensity_window`)."""
    image = read_image(entry.path, channels, window)
    h, w = image.shape[:2]
    mask = np.zeros((h, w), dtype=bool)
    if entry.mask_path is not None:
        mask = read_mask(entry.mask_path)
        if mask.shape != (h, w):
            raise DataError(f"mask {entry.mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                            f"{entry.path} is {w}x{h}: masks must have the size of their image")
    return {
        "image": _png_bytes(image),
        "mask": _png_bytes(mask.astype(np.uint8)[..., None] * 255),
        "has_mask": bool(entry.has_mask),
        "label": "good" if entry.defect_type == "good" else "defect",
        "defect_type": entry.defect_type,
        "id": entry.id,
        "file_name": entry.file_name,
    }


def category_channels(entries: list[Entry]) -> int:
    """3 if any image of the category is in colour, else 1."""
    return 3 if any(image_channels(e.path) == 3 for e in entries) else 1


# How `read_image` turns files into arrays; part of every fingerprint, so that folders prepared by
# an older reader are prepared again (2: EXIF orientation applied).
READER_VERSION = 2


def fingerprint(root: str | os.PathLike, category: str) -> str:
    """Short hash of the category folder's absolute path and file list (names, sizes, mtimes), and
    of the reader's version (`READER_VERSION`)."""
    cat = Path(root).resolve() / category
    h = hashlib.sha1(str(cat).encode())
    h.update(f"reader {READER_VERSION}\n".encode())
    for dirpath, dirnames, filenames in os.walk(cat):
        dirnames.sort()
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            h.update(f"{os.path.relpath(os.path.join(dirpath, name), cat)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:10]


# --------------------------------------------------------------------------- locating MVTec AD


def locate_root(manual: str | os.PathLike, category: str, work_dir: str | os.PathLike) -> Path:
    """The folder holding `category/` for a user-given MVTec AD location.

    `manual`: the folder holding the category folders, a folder holding
    ``mvtec_anomaly_detection/`` or ``mvtec_anomaly_detection.tar.xz``, or the .tar.xz itself
    (the category is then extracted into `work_dir`). DataError says what was expected and found.
    """
    manual = Path(manual).expanduser()
    if manual.is_file() and manual.name.endswith((".tar.xz", ".tar", ".tar.gz", ".tgz")):
        return extract_category(manual, category, Path(work_dir))
    if manual.is_dir():
        for cand in (manual, manual / "mvtec_anomaly_detection"):
            if (cand / category).is_dir():
                return cand
        archive = manual / ARCHIVE_NAME
        if archive.is_file():
            return extract_category(archive, category, Path(work_dir))
    raise DataError(
        f"MVTec AD category {category!r} not found: expected {manual / category}/train/good/ "
        f"(or {manual / 'mvtec_anomaly_detection' / category}/, or {manual / ARCHIVE_NAME}); {_listing(manual)}.\n"
        + MANUAL_DOWNLOAD_INSTRUCTIONS)


def extract_dir(tfds_dir: str | os.PathLike) -> Path:
    """Where categories extracted from the .tar.xz are kept while they are prepared."""
    return Path(os.fspath(tfds_dir)) / "downloads" / "mvtec_ad_extracted"


def extract_category(archive: Path, category: str, work_dir: Path) -> Path:
    """Extract the members of `category` from an MVTec AD tar archive into work_dir; return the root."""
    out = work_dir / f"extract_{category}"
    done = out / ".complete"
    if done.exists():
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    print(f"extracting {category} from {archive} (one pass over the archive) ...", file=sys.stderr)
    found = 0
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if category not in parts or not (member.isfile() or member.isdir()):
                continue
            i = parts.index(category)
            rel = Path(*parts[i:])
            if ".." in rel.parts:
                continue
            if member.isdir():
                (out / rel).mkdir(parents=True, exist_ok=True)
                continue
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is None:
                continue
            with src, open(out / rel, "wb") as dst:
                shutil.copyfileobj(src, dst)
            found += 1
    if not found:
        raise DataError(f"{archive} holds no files under {category}/: is it the MVTec AD archive ({ARCHIVE_NAME})?")
    done.touch()
    return out


