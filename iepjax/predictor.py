"""Run an exported model (`iepjax.export`, export.py) on image files: jax, numpy and image I/O only.

An exported folder holds the projection (docs/method.md, Projection) and the reconstruction-error
map as `jax.export` programs, the trained parameters, and metadata.json with the preprocessing
and the thresholds. `Predictor` loads it in a process that never imports flax, optax, orbax or
TensorFlow Datasets, and gives for each image (docs/method.md, Anomaly maps):

* the raw anomaly map mean_c |x_T - x0| at the image's original size (the image preprocessed as
  project.py does: objects resized to the model size, textures tiled at the training scale and
  the tile maps stitched with blending; the map resized back, `iepjax.data.preprocess`);
* the image score s of the map at the model size (size x size, the scale at which the image
  threshold was fitted on held-out normal images, as project.py's scores.csv): the mean of its
  top pixels (the default) or its maximum, as the export's metadata says (`image_score`);
* the label s >= image threshold, and the mask: map >= pixel threshold;
* the normalised score n = s / (s + t), t the image threshold: 0 for a zero map, 0.5 exactly at
  the threshold, towards 1 for s >> t; monotone, so n >= 0.5 <=> s >= t; s = t n / (1 - n).

`predict_paths` (predict.py) writes scores.csv, TIFF maps, mask and overlay PNGs and reports
files it cannot read without stopping.

Loading checks each artefact's sha256 against metadata.json and the jax calling-convention
window; a tampered, truncated or incompatible artefact raises `ExportError`, whose message says
to re-export from the run folder (which keeps the checkpoint).
"""
from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

FORMAT = "iepjax-export"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
PARAMS_FILE = "params.npz"
PROGRAM_FILES = {"projection": "projection.jaxexport", "recon": "recon.jaxexport"}
CARD_FILE = "MODEL_CARD.md"
# never imported by this module (tests check `sys.modules` after a prediction)
TRAINING_MODULES = ("flax", "optax", "orbax", "tensorflow_datasets", "tensorflow")
SCORE_COLUMNS = ("file", "image_score", "normalised_score", "label", "anomalous_fraction", "width", "height",
                 "status", "error")
NORMALISATION = "n = s / (s + t): s the image score, t the stored image threshold; n = 0.5 at s = t"


class ExportError(RuntimeError):
    """An exported model folder that cannot be used; the message says why and how to re-export."""


# --------------------------------------------------------------------------- loading and checks


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _reexport(meta: dict | None) -> str:
    cmd = ((meta or {}).get("source") or {}).get("reexport_command") or \
        "python export.py --category NAME [--run RUN_FOLDER] --out FOLDER"
    return f"re-export the model from its run folder, which keeps the checkpoint: {cmd}"


def _versions(meta: dict | None) -> str:
    import jax
    made = ((meta or {}).get("created_by") or {}).get("jax", "an unknown version")
    return f"exported with jax {made}, loaded with jax {jax.__version__}"


def read_metadata(model_dir: str | os.PathLike) -> dict:
    """metadata.json of an exported folder, checked for its format; ExportError if it is not one."""
    path = Path(model_dir) / METADATA_FILE
    if not Path(model_dir).is_dir():
        raise ExportError(f"model folder {model_dir} does not exist")
    if not path.is_file():
        raise ExportError(f"{model_dir} has no {METADATA_FILE}: not an exported model folder (export.py writes it "
                          f"last, so an interrupted export has none); {_reexport(None)}")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON ({e}); {_reexport(None)}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ExportError(f"{path} is not the metadata of an iepjax export; {_reexport(None)}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ExportError(f"{path} has export format version {version}; this iepjax reads version "
                          f"{FORMAT_VERSION}; {_reexport(meta)}")
    return meta


def _checked_bytes(model_dir: Path, meta: dict, entry: dict) -> bytes:
    """The bytes of one artefact, after checking its size and sha256 against the metadata."""
    path = model_dir / entry["file"]
    if not path.is_file():
        raise ExportError(f"{path} is missing; {_reexport(meta)}")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise ExportError(f"{path} does not match the sha256 recorded in {METADATA_FILE} at export time "
                          f"({len(data)} bytes, {entry.get('bytes', '?')} exported): it was truncated, changed or "
                          f"replaced; {_reexport(meta)}")
    return data


def load_program(model_dir: str | os.PathLike, meta: dict, name: str):
    """The `jax.export.Exported` of program `name` ("projection" or "recon"), checked.

    Raises ExportError when the file is missing, its sha256 differs from the metadata's, it
    cannot be deserialized, its calling convention is outside this jax's window, or it was not
    lowered for the platform this process runs on.
    """
    import jax
    from jax import export as jex

    entry = meta["artefacts"][name]
    data = _checked_bytes(Path(model_dir), meta, entry)
    try:
        exported = jex.deserialize(bytearray(data))
    except Exception as e:  # flatbuffer, StableHLO or pytree errors of another jax version
        raise ExportError(f"cannot load {entry['file']} ({_versions(meta)}): {type(e).__name__}: {e}; "
                          f"{_reexport(meta)}") from e
    lo, hi = jex.minimum_supported_calling_convention_version, jex.maximum_supported_calling_convention_version
    cc = exported.calling_convention_version
    if not lo <= cc <= hi:
        raise ExportError(f"{entry['file']} uses jax.export calling convention {cc}; this jax ({jax.__version__}) runs "
                          f"{lo} to {hi}: the artefact is outside jax's compatibility window ({_versions(meta)}); "
                          f"{_reexport(meta)}")
    here = jex.default_export_platform()
    if here not in exported.platforms:
        raise ExportError(f"{entry['file']} was lowered for {', '.join(exported.platforms)}, and this process runs "
                          f"on {here}; {_reexport(meta)} --platforms {','.join((*exported.platforms, here))}")
    return exported


def load_params(model_dir: str | os.PathLike, meta: dict) -> list[np.ndarray]:
    """The parameters of params.npz as the programs take them: a list in metadata's order."""
    entry = meta["artefacts"]["params"]
    data = _checked_bytes(Path(model_dir), meta, entry)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = [np.asarray(z[name]) for name in entry["names"]]
    except Exception as e:
        raise ExportError(f"cannot read {entry['file']}: {type(e).__name__}: {e}; {_reexport(meta)}") from e
    return arrays


class ModelOutputs(NamedTuple):
    """Outputs of the projection program for M model inputs (size x size).

    x_T: (M, S, S, C) projected images in [0, 1]; maps: (M, S, S) mean_c |x_T - x0|, smoothed;
    energies: (M, T) the energy at each step.
    """

    x_T: np.ndarray
    maps: np.ndarray
    energies: np.ndarray


class Prediction(NamedTuple):
    """The result for one image of (H, W) pixels.

    map: (H, W) float32 raw anomaly map at the original size; mask: (H, W) bool, map >= the
    pixel threshold; score: `image_score` of the map at the model size (the scale of the image threshold);
    normalised: score / (score + image threshold) in [0, 1]; label: 1 if score >= image threshold.
    """

    map: np.ndarray
    mask: np.ndarray
    score: float
    normalised: float
    label: int


def image_score(map_HxW: np.ndarray, rule: dict) -> float:
    """The image score of one map by the export's rule (metadata "scores"/"rule"): the maximum, or the mean
    of the top `topk_frac` of the pixels (at least one), as `calibrated_maps.image_score` computes them."""
    a = np.asarray(map_HxW, np.float64)
    if rule["image_score"] == "max":
        return float(a.max())
    k = max(1, int(round(a.size * float(rule["topk_frac"]))))
    return float(np.partition(a.ravel(), a.size - k)[a.size - k:].mean())


def normalise(score: float | np.ndarray, threshold: float) -> float | np.ndarray:
    """n = s / (s + t) for scores s >= 0 and the image threshold t > 0: 0 -> 0, t -> 0.5, inf -> 1."""
    s = np.maximum(np.asarray(score, np.float64), 0.0)
    t = float(threshold)
    if t <= 0:  # a degenerate threshold: every positive score is above it
        n = np.where(s > 0, 1.0, 0.5)
    else:
        n = s / (s + t)
    return float(n) if np.ndim(n) == 0 else n


def _pow2_at_most(n: int, cap: int) -> int:
    """The smallest power of two >= n, at most cap (few compiled batch shapes, little padding)."""
    b = 1
    while b < n and b < cap:
        b *= 2
    return min(b, cap)


def preprocess_from_metadata(pre: dict):
    """The run's `iepjax.data.preprocess.Preprocess` from an export's metadata ("preprocessing"), so
    that the maps equal project.py's. Exports written before it recorded "upsample" and
    "pixel_scale" brought each texture image to a short side of size / texture_fov, upsampled or
    not: True and 0 for them."""
    from iepjax.data.preprocess import Preprocess
    return Preprocess(kind=pre["kind"], size=pre["size"], texture_fov=pre["texture_fov"],
                      tile_stride=pre["tile_stride"], upsample=pre.get("upsample", True),
                      pixel_scale=pre.get("pixel_scale", 0.0), intensity_window=pre.get("intensity_window"))


class Predictor:
    """An exported model, ready to localise defects in images (module docstring).

    Args:
      model_dir: a folder written by export.py / `iepjax.export.export_run`.
      batch_size: model inputs (size x size images or tiles) per program call. Every call has this
        batch size (the last batch padded; rounded up to a multiple of the devices), so one
        compiled program serves any number of images of any sizes; a job of fewer inputs runs as
        one batch padded to a power of two.
      devices: the devices each batch is split over, each running the exported single-device
        program on its share (default: all local devices of the default backend), as project.py
        splits its batches. XLA:CPU runs a convolution on one core, so on a CPU give JAX one
        device per core (predict.py does, `iepjax.cpu_runtime.use_cpu_cores`).
    """

    def __init__(self, model_dir: str | os.PathLike, *, batch_size: int = 16, devices: Sequence | None = None):
        import jax

        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: give 1 or more")
        self.model_dir = Path(model_dir)
        self.metadata = meta = read_metadata(self.model_dir)
        self.batch_size = int(batch_size)
        self.devices = list(devices) if devices else jax.local_devices()
        if len(self.devices) > 1:  # the batch split over the devices: one program, compiled once
            from jax.sharding import Mesh, NamedSharding, PartitionSpec
            self._mesh = Mesh(np.array(self.devices), ("batch",))
            self._x_sharding = NamedSharding(self._mesh, PartitionSpec("batch"))
            where = NamedSharding(self._mesh, PartitionSpec())  # parameters replicated
        else:
            self._mesh, self._x_sharding = None, self.devices[0]
            where = self.devices[0]
        self._exported, self._calls = {}, {}
        self._program("projection")
        self._params = jax.device_put(load_params(self.model_dir, meta), where)
        pre = meta["preprocessing"]
        self.prep = preprocess_from_metadata(pre)
        self.channels = int(pre["channels"])
        th = meta["thresholds"]
        self.pixel_threshold = float(th["pixel_threshold"])
        self.image_threshold = float(th["image_threshold"])
        self.score_rule = meta["scores"].get("rule", {"image_score": "max"})  # exports without a rule: the max
        self.vmax = float(th.get("vmax") or max(self.pixel_threshold, 1e-6))

    # ------------------------------------------------------------------ the programs

    def _program(self, name: str):
        """The jitted call of program `name` (loaded and checked on first use); with several devices, each
        runs the single-device program on its share of the batch (`shard_map`)."""
        if name not in self._calls:
            import jax
            exported = load_program(self.model_dir, self.metadata, name)
            call = exported.call
            if self._mesh is not None:
                from jax.sharding import PartitionSpec
                call = jax.shard_map(call, mesh=self._mesh, in_specs=(PartitionSpec(), PartitionSpec("batch")),
                                     out_specs=PartitionSpec("batch"), check_vma=False)
            self._exported[name], self._calls[name] = exported, jax.jit(call)
        return self._calls[name]

    def _run(self, name: str, x_MxSxSxC: np.ndarray) -> list[np.ndarray]:
        """Run program `name` over M model inputs in batches of `batch_size` (the last one padded with
        copies of its last input; M < batch_size: one batch padded to a power of two)."""
        import jax

        x = np.asarray(x_MxSxSxC, np.float32)
        s, c = self.prep.size, self.channels
        if x.ndim != 4 or x.shape[1:] != (s, s, c):
            raise ValueError(f"model inputs must be (M, {s}, {s}, {c}) floats in [0, 1], got {x.shape}")
        call = self._program(name)
        outs: list[list[np.ndarray]] = []
        # one batch shape (one compile) for everything but jobs smaller than a batch; a multiple of the devices
        b = self.batch_size if len(x) >= self.batch_size else _pow2_at_most(len(x), self.batch_size)
        b = -(-b // len(self.devices)) * len(self.devices)
        try:
            for i in range(0, len(x), b):
                xb = x[i:i + b]
                real = len(xb)
                if real < b:
                    xb = np.concatenate([xb, np.repeat(xb[-1:], b - real, axis=0)])
                got = jax.device_get(call(self._params, jax.device_put(xb, self._x_sharding)))
                outs.append([np.asarray(a)[:real] for a in got])
        except Exception as e:  # a program that loads but does not run on this jax/backend
            raise ExportError(f"running {self.metadata['artefacts'][name]['file']} failed ({_versions(self.metadata)}): "
                              f"{type(e).__name__}: {e}; if the versions differ, {_reexport(self.metadata)}") from e
        if not outs:
            raise ValueError("no model inputs")
        return [np.concatenate(parts) for parts in zip(*outs)]

    def project(self, x0_MxSxSxC: np.ndarray) -> ModelOutputs:
        """The projection of M model inputs (M, size, size, C) float32 in [0, 1] (docs/method.md, Projection)."""
        return ModelOutputs(*self._run("projection", x0_MxSxSxC))

    def reconstruct(self, x0_MxSxSxC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(f(x0) (M, S, S, C), the reconstruction-error maps mean_c |x0 - f(x0)| (M, S, S)) of M model inputs."""
        f, m = self._run("recon", x0_MxSxSxC)
        return f, m

    # ------------------------------------------------------------------ images

    def _as_model_channels(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W) or (H, W, 1|3|4) -> (H, W, channels), converted as `iepjax.data.layout.read_image` does.
        A model trained on high-depth images takes gray (H, W) or (H, W, 1) integer or float arrays of
        their values instead, mapped to uint8 through the run's intensity window."""
        im = np.asarray(image)
        if im.dtype == np.uint8 and self.prep.intensity_window is not None:
            raise TypeError("this model was trained on high-depth images, read through an intensity window: pass "
                            "the images' own values ((H, W) or (H, W, 1), integer or float), not uint8")
        if im.dtype != np.uint8:
            window = self.prep.intensity_window
            if window is None or im.dtype.kind not in "uif" or not (im.ndim == 2 or im.shape[2:] == (1,)):
                raise TypeError(f"expected uint8 images, got {im.dtype} {im.shape}" + (
                    "" if window is None else " (or the gray values of high-depth images, (H, W) or (H, W, 1))"))
            from iepjax.data.layout import to_uint8
            im = to_uint8(im.reshape(im.shape[:2]), window, "given as an array")
        if im.ndim == 2:
            im = im[..., None]
        if im.ndim != 3 or im.shape[2] not in (1, 3, 4):
            raise ValueError(f"expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, got {im.shape}")
        if im.shape[2] == self.channels:
            return im
        from PIL import Image
        pil = Image.fromarray(im[..., 0] if im.shape[2] == 1 else im)
        out = np.asarray(pil.convert("L" if self.channels == 1 else "RGB"), dtype=np.uint8)
        return out[..., None] if out.ndim == 2 else out

    def predict_images(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """`Prediction`s of uint8 images of any sizes ((H, W) or (H, W, C); C converted to the model's)."""
        from iepjax.data.preprocess import model_inputs, resize_map, stitch

        images = [self._as_model_channels(im) for im in images]
        if not images:
            return []
        inputs, layouts = model_inputs(images, self.prep)
        maps = self.project(inputs.astype(np.float32) / 255.0).maps
        s = self.prep.size
        out = []
        for lay in layouts:
            work = stitch(maps, lay)  # working resolution
            full = resize_map(work, lay.orig_hw)
            score = image_score(resize_map(work, (s, s)), self.score_rule)  # the view the thresholds were fitted on
            out.append(Prediction(full, full >= self.pixel_threshold, score,
                                  normalise(score, self.image_threshold), int(score >= self.image_threshold)))
        return out

    def predict(self, files: Sequence[str | os.PathLike]) -> list[Prediction]:
        """`Prediction`s of image files (read as the model's channels); DataError names an unreadable file."""
        from iepjax.data.layout import read_image
        return self.predict_images([read_image(f, self.channels, self.prep.intensity_window) for f in files])


# --------------------------------------------------------------------------- files in, files out


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders (searched recursively for image files) and glob patterns -> (files, missing).

    files: unique, in the order given (a folder's files sorted); missing: (argument, reason) for
    an argument that names nothing.
    """
    from iepjax.data.layout import IMAGE_EXTENSIONS

    def folder_files(d: Path) -> list[Path]:
        return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                      and not any(part.startswith(".") for part in p.relative_to(d).parts))

    files: list[Path] = []
    missing: list[tuple[str, str]] = []
    for arg in inputs:
        p = Path(arg)
        if p.is_dir():
            found = folder_files(p)
            if not found:
                missing.append((arg, f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder"))
            files += found
        elif p.is_file():
            files.append(p)
        else:
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                missing.append((arg, "no such file, folder or matching pattern"))
            for m in matches:
                mp = Path(m)
                files += folder_files(mp) if mp.is_dir() else [mp]
    seen, unique = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, missing


def output_names(files: Sequence[Path]) -> list[str]:
    """Each file's path relative to the deepest folder holding them all, extension kept (x.png and
    x.jpg stay apart), as a posix string."""
    if not files:
        return []
    resolved = [f.resolve() for f in files]
    root = Path(os.path.commonpath([str(r.parent) for r in resolved]))
    return [r.relative_to(root).as_posix() for r in resolved]


_HOT = np.array([[0, 0, 0], [128, 0, 0], [230, 40, 0], [255, 160, 0], [255, 255, 120], [255, 255, 255]], np.float32)


def heat_colors(map_HxW: np.ndarray, vmax: float) -> np.ndarray:
    """uint8 (H, W, 3) colours of a map scaled by vmax (black - red - yellow - white)."""
    t = np.clip(np.asarray(map_HxW, np.float32) / max(vmax, 1e-12), 0, 1) * (len(_HOT) - 1)
    i = np.minimum(t.astype(np.int32), len(_HOT) - 2)
    f = (t - i)[..., None]
    return np.rint(_HOT[i] * (1 - f) + _HOT[i + 1] * f).astype(np.uint8)


def overlay_image(image_HxWxC: np.ndarray, map_HxW: np.ndarray, mask_HxW: np.ndarray, vmax: float) -> np.ndarray:
    """uint8 (H, 2W + 4, 3): the image | the image under its heat map, the mask's outline in cyan."""
    im = np.asarray(image_HxWxC, np.uint8)
    rgb = np.repeat(im, 3, axis=2) if im.shape[2] == 1 else im[..., :3]
    heat = heat_colors(map_HxW, vmax).astype(np.float32)
    a = np.clip(np.asarray(map_HxW, np.float32) / max(vmax, 1e-12), 0, 1)[..., None] * 0.7
    over = (rgb.astype(np.float32) * (1 - a) + heat * a)
    m = np.asarray(mask_HxW, bool)
    edge = m & ~(np.pad(m, 1, mode="edge")[:-2, 1:-1] & np.pad(m, 1, mode="edge")[2:, 1:-1]
                 & np.pad(m, 1, mode="edge")[1:-1, :-2] & np.pad(m, 1, mode="edge")[1:-1, 2:])
    over[edge] = (0, 255, 255)
    gap = np.full((rgb.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([rgb, gap, np.rint(over).astype(np.uint8)], axis=1)


class Summary(NamedTuple):
    """What `predict_paths` did: counts, the failed inputs (name, reason) and the output folder."""

    n_images: int
    n_ok: int
    n_flagged: int
    failed: list
    out_dir: Path


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file's header (nothing decoded); DataError if it is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    from iepjax.data.layout import DataError
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e
    return h, w


def predict_paths(model_dir: str | os.PathLike, inputs: Sequence[str], out_dir: str | os.PathLike, *,
                  batch_size: int = 16, chunk: int = 64, overlays: bool = True, masks: bool = True,
                  progress: bool = True, predictor: Predictor | None = None) -> Summary:
    """Predict every image named by `inputs` (files, folders, globs) and write out_dir (predict.py).

    Writes scores.csv (SCORE_COLUMNS: one row per input, status "ok" or "error" with the reason),
    maps/<name>.tiff (float32 raw map at the original size), masks/<name>.png (255 where map >=
    pixel threshold), overlays/<name>.png and summary.json; <name> is the file's path relative to
    the inputs' common folder, extension kept. Images are ordered by size (read from the file
    headers) and read `chunk` at a time; their model inputs (resized images or tiles) run in
    batches of `batch_size`. A file that cannot be read is reported (stderr and its row) and the
    others go on. ExportError if the model folder cannot be used.
    """
    import tifffile
    from PIL import Image

    from iepjax.data.layout import DataError, read_image

    pred = predictor or Predictor(model_dir, batch_size=batch_size)
    out_dir = Path(out_dir)
    files, missing = expand_inputs(inputs)
    names = output_names(files)
    rows: dict[int, list] = {}
    failed: list[tuple[str, str]] = []

    def fail(i: int | None, name: str, reason: str) -> None:
        print(f"error: {reason}", file=sys.stderr)
        failed.append((name, reason))
        if i is not None:
            rows[i] = [name, "", "", "", "", "", "", "error", reason]

    by_size: dict[tuple[int, int], list[int]] = {}
    for i, f in enumerate(files):
        try:
            by_size.setdefault(_image_size(f), []).append(i)
        except DataError as e:
            fail(i, names[i], str(e))
    order = [i for size in sorted(by_size) for i in by_size[size]]  # images of one size together
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(files), desc="predict", unit="img", dynamic_ncols=True)
        bar.update(len(failed))
    n_flagged = 0
    try:
        for c0 in range(0, len(order), chunk):
            idx, images = [], []
            for i in order[c0:c0 + chunk]:
                try:
                    images.append(read_image(files[i], pred.channels, pred.prep.intensity_window))
                    idx.append(i)
                except DataError as e:
                    fail(i, names[i], str(e))
                    if bar is not None:
                        bar.update(1)
            for i, im, p in zip(idx, images, pred.predict_images(images)):
                name = names[i]
                tiff = out_dir / "maps" / f"{name}.tiff"
                tiff.parent.mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(tiff, p.map.astype(np.float32))
                if masks:
                    mpath = out_dir / "masks" / f"{name}.png"
                    mpath.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(p.mask.astype(np.uint8) * 255).save(mpath)
                if overlays:
                    opath = out_dir / "overlays" / f"{name}.png"
                    opath.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(overlay_image(im, p.map, p.mask, pred.vmax)).save(opath)
                h, w = p.map.shape
                rows[i] = [name, f"{p.score:.6g}", f"{p.normalised:.6f}", p.label, f"{float(p.mask.mean()):.6g}",
                           w, h, "ok", ""]
                n_flagged += p.label
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    for arg, reason in missing:
        fail(None, arg, f"{arg}: {reason}")
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(SCORE_COLUMNS)
    w.writerows(rows[i] for i in sorted(rows))
    w.writerows([arg, "", "", "", "", "", "", "error", reason] for arg, reason in missing)
    (out_dir / "scores.csv").write_text(buf.getvalue())
    n_ok = sum(r[7] == "ok" for r in rows.values())
    meta = pred.metadata
    summary = {"model": str(pred.model_dir), "category": meta["source"].get("category"),
               "n_images": len(files), "n_ok": n_ok, "n_failed": len(failed), "n_flagged": n_flagged,
               "image_threshold": pred.image_threshold, "pixel_threshold": pred.pixel_threshold,
               "thresholds_from": meta["thresholds"]["source"], "normalisation": NORMALISATION,
               "image_score": meta["scores"]["image_score"], "failed": [{"input": n, "error": r} for n, r in failed]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return Summary(len(files), n_ok, n_flagged, failed, out_dir)
