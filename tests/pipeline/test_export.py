"""export.py / predict.py / `iepjax.Predictor`: an exported run gives project.py's numbers without the training code.

End to end (marked slow, like test_scripts.py): a copy of the suite's tiny run (conftest `tiny_run`:
`train.py --size 32 --steps 4` and `project.py --steps 3` on the built-in brick data, made once per
pytest run), `export.py` of the run, then a fresh
subprocess that cannot import flax, optax, orbax or TFDS predicts a folder of real image files
of mixed sizes (and a corrupt and a truncated one). The fast tests export programs of the
suite's tiny model in this process.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import copy_results, run_script
from iepjax import ModelConfig, ProjectionConfig, project_fn
from iepjax.predictor import ExportError, Predictor, expand_inputs, normalise, output_names, read_metadata

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 600
slow = pytest.mark.slow
TRAINING_MODULES = ("flax", "optax", "orbax", "tensorflow_datasets", "tensorflow")


_run = run_script  # conftest: a script end to end from the repository root


# --------------------------------------------------------------------------- fast: the programs and helpers


@pytest.fixture(scope="module")
def tiny_export(params):
    """Programs of the suite's tiny model (initial parameters), 3 steps with early stopping and backtracking."""
    from iepjax.export import export_programs

    x = _pattern(4)
    # a stop loss between the images' losses, so that some images stop and some do not
    from iepjax.energy import energy
    cfg0 = ProjectionConfig(model=ModelConfig(size=32, channels=1), steps=3, alpha=0.5, lam=0.05)
    losses = np.asarray(jax.vmap(lambda xi: energy(params, xi, xi, cfg0)[0])(x))
    cfg = dataclasses.replace(cfg0, stop_loss=float(np.median(losses)))
    programs, skipped, formulation = export_programs(params, cfg, ("cpu", "cuda"))
    return dict(programs=programs, skipped=skipped, formulation=formulation, config=cfg, x=x, losses=losses)


def _pattern(n: int) -> np.ndarray:
    from conftest import pattern_images
    return pattern_images(n, seed=3)


def test_exported_projection_equals_project_fn_at_batch_sizes_never_seen(tiny_export, params):
    """The exported program (symbolic batch) equals `project_fn` (early stop, backtracking) at batch 1 and 3."""
    from iepjax.export import flat_params

    ex, cfg, x = tiny_export["programs"]["projection"], tiny_export["config"], tiny_export["x"]
    assert "b" in str(ex.in_avals[-1]) and ex.platforms == ("cpu", "cuda")
    assert tiny_export["skipped"] == {} and tiny_export["formulation"] == {"cpu": "xla_cpu", "cuda": "plain"}
    _, arrays = flat_params(params)
    assert np.any(tiny_export["losses"] <= cfg.stop_loss) and np.any(tiny_export["losses"] > cfg.stop_loss)
    ref = project_fn(params, x, cfg, conv="xla_cpu")  # what project.py runs on a CPU
    for sl in (slice(0, 1), slice(1, 4)):
        got = ex.call(arrays, x[sl])
        for a, b in zip(got, (ref.x_T, ref.maps, ref.energies)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b)[sl], atol=1e-6, rtol=1e-6)


def test_the_program_for_other_platforms_uses_the_plain_convolutions(params):
    """Lowered for CUDA, the program is `project_fn(conv="plain")`: run here on the CPU with jax.export's
    platform check disabled, it gives the plain formulation's numbers."""
    from jax import export as jex

    from iepjax.export import flat_params, per_platform, projection_program, without_dead_code

    cfg = ProjectionConfig(model=ModelConfig(size=32, channels=1), steps=2, alpha=0.5, lam=0.05)
    names, arrays = flat_params(params)
    tree = jax.tree.structure(params)
    program, choice = per_platform(projection_program, cfg, ("cpu", "cuda"))
    assert choice == {"cpu": "xla_cpu", "cuda": "plain"}

    def from_flat(flat, x0):
        return program(jax.tree.unflatten(tree, flat), x0)
    b, = jex.symbolic_shape("b")
    specs = ([jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays], jax.ShapeDtypeStruct((b, 32, 32, 1), np.float32))
    cuda = jex.export(jax.jit(without_dead_code(from_flat, *specs)), platforms=("cuda",),
                      disabled_checks=[jex.DisabledSafetyCheck.platform()])(*specs)
    x = _pattern(2)
    ref = project_fn(params, x, cfg, conv="plain")
    for a, r in zip(cuda.call(arrays, x), (ref.x_T, ref.maps, ref.energies)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-6, rtol=1e-6)


def test_exported_recon_map_equals_the_evaluation_row(tiny_export, params):
    """The reconstruction-error program gives f(x0) and mean_c |x0 - f(x0)| (smoothed) as `recon_map`."""
    from iepjax.anomaly_maps import recon_map
    from iepjax.energy import reconstruct
    from iepjax.export import flat_params

    cfg, x = tiny_export["config"], tiny_export["x"][:2]
    f, m = tiny_export["programs"]["recon"].call(flat_params(params)[1], x)
    np.testing.assert_allclose(np.asarray(f), np.stack([reconstruct(params, xi, cfg) for xi in x]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(m), np.stack([recon_map(params, xi, cfg) for xi in x]), atol=1e-6)


def test_normalised_score_is_one_half_at_the_threshold():
    t = 0.2
    assert normalise(0.0, t) == 0.0 and normalise(t, t) == 0.5 and 0.99 < normalise(100 * t, t) < 1.0
    s = np.linspace(0, 3, 301)
    n = normalise(s, t)
    assert np.all(np.diff(n) > 0)  # monotone
    assert np.array_equal(n >= 0.5, s >= t)  # the label at the threshold is the same either way
    np.testing.assert_allclose(t * n / (1 - n), s, atol=1e-12)  # invertible: the raw score is recoverable


@pytest.mark.parametrize("prep", [
    dict(kind="texture", size=32, texture_fov=0.25, tile_stride=16, upsample=False),  # an own folder's textures
    dict(kind="texture", size=32, texture_fov=0.25, upsample=False, pixel_scale=0.75),  # ... trained by now
    dict(kind="texture", size=32, texture_fov=0.5),
    dict(kind="object", size=32)])
def test_the_predictor_preprocesses_as_the_run_did(prep):
    """The export's metadata carries every field that decides the model inputs: the predictor's
    `Preprocess` is the run's, so an own folder's 40 px texture image (working scale 128 px, but
    never upsampled) gives the tiles project.py gives."""
    from iepjax.data.preprocess import Preprocess, model_inputs
    from iepjax.export import preprocessing_metadata
    from iepjax.predictor import preprocess_from_metadata

    run = Preprocess(**prep)
    meta = json.loads(json.dumps(preprocessing_metadata(run, channels=1)))  # as metadata.json stores it
    back = preprocess_from_metadata(meta)
    assert back == run
    image = np.zeros((40, 48, 1), np.uint8)
    assert model_inputs([image], back)[0].shape == model_inputs([image], run)[0].shape
    legacy = {k: v for k, v in meta.items() if k not in ("upsample", "pixel_scale")}  # exports made before the keys
    assert preprocess_from_metadata(legacy).upsample and not preprocess_from_metadata(legacy).pixel_scale


def test_inputs_files_folders_and_globs_keep_their_extensions(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/x.png", "a/x.jpg", "a/deep/y.bmp", "a/.hidden.png", "a/notes.txt", "z.tif"):
        (tmp_path / name).write_bytes(b"")
    files, missing = expand_inputs([str(tmp_path / "a"), str(tmp_path / "*.tif"), str(tmp_path / "a" / "x.png"),
                                    str(tmp_path / "none*.png")])
    names = output_names(files)
    assert names == ["a/deep/y.bmp", "a/x.jpg", "a/x.png", "z.tif"]  # x.png named twice: once
    assert len(set(names)) == len(names) and [m[0] for m in missing] == [str(tmp_path / "none*.png")]


# --------------------------------------------------------------------------- end to end




@pytest.fixture(scope="module")
def e2e(tmp_path_factory, env, tiny_run):
    """A copy of the suite's tiny run and its projection (conftest: train.py, project.py --steps 3
    --no-early-stop), its export (export.py) and a folder of image files."""
    tmp = tmp_path_factory.mktemp("export")
    results, _ = copy_results(tiny_run, tmp / "results")
    model = tmp / "model"
    # the tiny run's 4-step model collapsed to the mean image: export.py refuses it unless allowed
    export = _run(["export.py", "--category", "brick", "--results", str(results), "--out", str(model),
                   "--allow-collapse"], env)
    assert export.returncode == 0, export.stderr[-3000:]
    run_dir = Path(json.loads((model / "metadata.json").read_text())["source"]["run_dir"])
    proj_dir = (run_dir / "projections" / "latest").resolve()
    assert run_dir.is_relative_to(results)  # the copy's run was exported

    from PIL import Image

    from iepjax.data import load_split
    test = load_split("textures", "brick", "test", str(tiny_run["tfds"]), progress=False)
    images = tmp / "images"
    (images / "sub").mkdir(parents=True)
    same = {}  # file name -> test id: images as project.py saw them (PNG is lossless)
    for k in (0, 7, 20):
        name = test.ids[k].replace("/", "_") + ".png"
        Image.fromarray(test.images[k][..., 0]).save(images / name)
        same[name] = test.ids[k]
    first = next(iter(same))
    Image.fromarray(test.images[0][..., 0]).save(images / first.replace(".png", ".jpg"), quality=90)
    Image.fromarray(test.images[3][..., 0]).resize((160, 96)).save(images / "sub" / "wide.png")
    rgb = np.repeat(test.images[5], 3, axis=2)
    Image.fromarray(rgb).resize((75, 90)).save(images / "sub" / "small_rgb.bmp")
    Image.fromarray(test.images[9][..., 0]).resize((200, 150)).save(images / "sub" / "big.tif")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    data = (images / first).read_bytes()
    (images / "sub" / "truncated.png").write_bytes(data[: len(data) // 2])
    (images / "notes.txt").write_text("not an image: left out of the folder's files")
    return dict(tmp=tmp, model=model, run_dir=run_dir, proj_dir=proj_dir, images=images, same=same,
                export=export, env=env, tfds=tiny_run["tfds"])


_FRESH = r"""
import importlib.abc, json, sys
BLOCKED = {blocked!r}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} must not be imported by the predictor")
        return None

sys.meta_path.insert(0, Block())
import runpy
import numpy as np
predict = runpy.run_path({predict!r}, run_name="predict_script")
code = predict["main"](["--model", {model!r}, {images!r}, "--out", {out!r}, "--no-progress"])
from iepjax import Predictor
from iepjax.data.layout import read_image
from iepjax.data.preprocess import model_inputs
out = {{"code": code}}
p3 = Predictor({model!r}, batch_size=3)
p5 = Predictor({model!r}, batch_size=5)
files = {files!r}
inputs, _ = model_inputs([read_image(f, p3.channels) for f in files], p3.prep)
x = inputs[:7].astype(np.float32) / 255.0
a, b = p3.project(x), p5.project(x)
one = p3.project(x[:1])
f, m = p5.reconstruct(x[:2])
np.savez({npz!r}, maps3=a.maps, maps5=b.maps, xT3=a.x_T, e3=a.energies, maps1=one.maps, x=x, recon=f, recon_maps=m)
r = p3.predict(files[:1])[0]
out.update(score=r.score, normalised=r.normalised, label=r.label, map_shape=list(r.map.shape),
           n_inputs=len(x), devices=len(p3.devices))
out["training_modules"] = sorted({{m.split(".")[0] for m in sys.modules}} & set(BLOCKED))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def fresh(e2e):
    """predict.py and the Predictor run in a fresh process in which importing flax, optax, orbax or TFDS fails."""
    out = e2e["tmp"] / "pred"
    files = [str(e2e["images"] / n) for n in e2e["same"]]
    code = _FRESH.format(blocked=TRAINING_MODULES, predict=str(ROOT / "predict.py"), model=str(e2e["model"]),
                         images=str(e2e["images"]), out=str(out), files=files, npz=str(e2e["tmp"] / "fresh.npz"))
    r = subprocess.run([sys.executable, "-c", code], cwd=e2e["tmp"], env=e2e["env"], capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    with np.load(e2e["tmp"] / "fresh.npz") as z:
        arrays = dict(z)
    with open(out / "scores.csv", newline="") as f:
        rows = {row["file"]: row for row in csv.DictReader(f)}
    return dict(result=result, out=out, rows=rows, stderr=r.stderr, arrays=arrays)


@slow
def test_export_refuses_a_collapsed_run_unless_allowed(e2e, tmp_path, capsys):
    """A model that collapsed to the mean image flags nothing (or everything): export.py says so
    and exits with the collapse status before any work; --allow-collapse exports it anyway (the
    fixture), and the re-export command it records keeps the flag."""
    import export

    from iepjax import cli
    record = json.loads((e2e["run_dir"] / "training.json").read_text())
    assert record["collapse"]["collapsed"]  # what the fixture's export needed --allow-collapse for
    rc = export.main(["--run", str(e2e["run_dir"]), "--out", str(tmp_path / "model")])
    assert rc == cli.EXIT_COLLAPSED and "collapsed" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()
    meta = json.loads((e2e["model"] / "metadata.json").read_text())
    assert meta["source"]["reexport_command"].endswith("--allow-collapse")


@slow
def test_metadata_names_platforms_versions_thresholds_and_checksums(e2e):
    import hashlib

    import jaxlib

    meta = read_metadata(e2e["model"])
    assert meta["format_version"] == 1 and {"cpu", "cuda"} <= set(meta["platforms"])
    assert meta["created_by"]["jax"] == jax.__version__ and meta["created_by"]["jaxlib"] == jaxlib.__version__
    for name in ("projection", "recon"):
        entry = meta["artefacts"][name]
        assert entry["platforms"] == meta["platforms"] and isinstance(entry["calling_convention_version"], int)
    for entry in meta["artefacts"].values():
        data = (e2e["model"] / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
    # settings, thresholds and metrics of the projection that project.py evaluated
    proj = e2e["proj_dir"]
    used = json.loads((proj / "thresholds.json").read_text())
    assert meta["source"]["projection_dir"] == str(proj)
    assert {k: meta["projection"][k] for k in used["projection"]} == used["projection"]
    assert meta["projection"]["steps"] == 3 and meta["projection"]["stop_loss"] is None
    assert meta["thresholds"]["pixel_threshold"] == used["grad"]["pixel_threshold"]
    assert meta["thresholds"]["image_threshold"] == used["grad"]["image_threshold"]
    assert meta["thresholds"]["source"] == "held-out normal training images" and meta["thresholds"]["n_images"] >= 1
    metrics = json.loads((proj / "metrics.json").read_text())
    assert meta["metrics"]["grad"]["pixel_auroc"] == metrics["grad"]["pixel_auroc"]
    pre = json.loads((e2e["run_dir"] / "preprocess.json").read_text())
    assert meta["preprocessing"]["kind"] == pre["kind"] == "texture" and meta["preprocessing"]["size"] == 32
    assert meta["preprocessing"]["pixel_scale"] == pre["pixel_scale"] == 0.5
    assert meta["training"]["dataset"] == "textures" and meta["training"]["category"] == "brick"
    assert meta["normalisation"]["formula"] == "s / (s + t)"
    card = (e2e["model"] / "MODEL_CARD.md").read_text()
    assert "brick" in card and "held-out normal" in card and "pixel AUROC" in card
    assert f"--run {e2e['run_dir']}" in meta["source"]["reexport_command"]


@slow
def test_predict_runs_without_the_training_code_and_reports_unreadable_files(e2e, fresh):
    res, rows = fresh["result"], fresh["rows"]
    assert res["training_modules"] == [], res
    assert res["code"] == 1  # some inputs failed, the others were processed
    ok = {"sub/wide.png", "sub/small_rgb.bmp", "sub/big.tif", *e2e["same"], next(iter(e2e["same"])).replace(".png", ".jpg")}
    assert {f for f, r in rows.items() if r["status"] == "ok"} == ok
    assert {f for f, r in rows.items() if r["status"] == "error"} == {"broken.png", "sub/truncated.png"}
    assert "cannot read image" in rows["broken.png"]["error"] and "broken.png" in fresh["stderr"]
    assert "notes.txt" not in rows
    sizes = {"sub/wide.png": (160, 96), "sub/small_rgb.bmp": (75, 90), "sub/big.tif": (200, 150)}
    import tifffile
    from PIL import Image
    for name in ok:
        m = tifffile.imread(fresh["out"] / "maps" / f"{name}.tiff")
        assert m.dtype == np.float32 and np.all(np.isfinite(m)) and m.min() >= 0
        w, h = sizes.get(name, (128, 128))
        assert m.shape == (h, w) and (int(rows[name]["width"]), int(rows[name]["height"])) == (w, h)
        mask = np.asarray(Image.open(fresh["out"] / "masks" / f"{name}.png"))
        t = read_metadata(e2e["model"])["thresholds"]
        assert np.array_equal(mask > 0, m >= t["pixel_threshold"])
        over = np.asarray(Image.open(fresh["out"] / "overlays" / f"{name}.png"))
        assert over.shape[0] == h and over.shape[1] > 2 * w and over.shape[2] == 3
        s, n = float(rows[name]["image_score"]), float(rows[name]["normalised_score"])
        assert n == pytest.approx(s / (s + t["image_threshold"]), abs=1e-6)
        assert int(rows[name]["label"]) == int(s >= t["image_threshold"])
    jpg = next(iter(e2e["same"])).replace(".png", ".jpg")
    assert (fresh["out"] / "maps" / f"{jpg}.tiff").is_file()  # x.png and x.jpg do not collide
    summary = json.loads((fresh["out"] / "summary.json").read_text())
    assert summary["n_ok"] == len(ok) and summary["n_failed"] == 2


@slow
def test_maps_and_labels_equal_project_py(e2e, fresh):
    """The 128x128 test images saved as PNG: predict.py's maps are project.py's TIFF maps (1e-5), same labels."""
    import tifffile

    from iepjax.outputs import tiff_path
    meta = read_metadata(e2e["model"])
    with open(e2e["proj_dir"] / "scores.csv", newline="") as f:
        theirs = {r["file"]: r for r in csv.DictReader(f)}
    assert any(float(fresh["rows"][n]["image_score"]) > 0 for n in e2e["same"])  # maps that are not all zero
    for name, id_ in e2e["same"].items():
        ref = tifffile.imread(tiff_path(e2e["proj_dir"] / "anomaly_maps" / "grad", "brick", id_))
        got = tifffile.imread(fresh["out"] / "maps" / f"{name}.tiff")
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
        row = fresh["rows"][name]
        assert float(row["image_score"]) == pytest.approx(float(theirs[id_]["image_score"]), rel=1e-4, abs=1e-6)
        assert int(row["label"]) == int(theirs[id_]["pred_label"])
    assert meta["thresholds"]["image_threshold"] == json.loads(
        (e2e["proj_dir"] / "metrics.json").read_text())["grad"]["image_threshold"]


@slow
def test_mixed_sizes_equal_project_fn_with_the_same_preprocessing(e2e, fresh):
    """Images of other sizes and an RGB file: the maps equal `project_fn` on `model_inputs` tiles, stitched and
    resized back, with the checkpoint's parameters (1e-5)."""
    import tifffile

    from iepjax.config import from_dict
    from iepjax.data.layout import read_image
    from iepjax.data.preprocess import Preprocess, model_inputs, resize_map, stitch

    meta = read_metadata(e2e["model"])
    params, arrays = _checkpoint_params(e2e)
    cfg = from_dict(ProjectionConfig, {k: v for k, v in meta["projection"].items() if k != "early_stop"})
    prep = Preprocess(**{k: meta["preprocessing"][k] for k in ("kind", "size", "texture_fov", "tile_stride", "upsample",
                                                               "pixel_scale")})
    names = ["sub/wide.png", "sub/small_rgb.bmp", "sub/big.tif"]
    images = [read_image(e2e["images"] / n, 1) for n in names]
    inputs, layouts = model_inputs(images, prep)
    maps = np.asarray(project_fn(params, inputs.astype(np.float32) / 255.0, cfg).maps)
    for name, lay in zip(names, layouts):
        ref = resize_map(stitch(maps, lay), lay.orig_hw)
        got = tifffile.imread(fresh["out"] / "maps" / f"{name}.tiff")
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    # batch sizes never seen at export time (3, 5, 1) give the same outputs
    a = fresh["arrays"]
    np.testing.assert_allclose(a["maps3"], a["maps5"], atol=1e-6)
    np.testing.assert_allclose(a["maps1"], a["maps3"][:1], atol=1e-6)
    ref = project_fn(params, a["x"], cfg)
    np.testing.assert_allclose(a["maps3"], np.asarray(ref.maps), atol=1e-5)
    np.testing.assert_allclose(a["xT3"], np.asarray(ref.x_T), atol=1e-5)
    assert fresh["result"]["n_inputs"] == 7 and fresh["result"]["devices"] == 2
    from iepjax.anomaly_maps import recon_map
    from iepjax.energy import reconstruct
    np.testing.assert_allclose(a["recon"], np.stack([reconstruct(params, xi, cfg) for xi in a["x"][:2]]), atol=1e-5)
    np.testing.assert_allclose(a["recon_maps"], np.stack([recon_map(params, xi, cfg) for xi in a["x"][:2]]), atol=1e-5)


def _checkpoint_params(e2e):
    """The run's parameters as the export stored them (params.npz), as a tree: equal to the checkpoint's."""
    from iepjax.export import flat_params
    from iepjax.model import init_params

    meta = read_metadata(e2e["model"])
    tree = jax.tree.structure(init_params(ModelConfig(**meta["model"]), key=jax.random.key(0)))
    with np.load(e2e["model"] / "params.npz") as z:
        arrays = [z[n] for n in meta["artefacts"]["params"]["names"]]
    params = jax.tree.unflatten(tree, arrays)
    assert flat_params(params)[0] == meta["artefacts"]["params"]["names"]
    return params, arrays


def _copy(e2e, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(e2e["model"], dst)
    return dst


def _set_artefact(model: Path, name: str, data: bytes) -> None:
    """Replace an artefact and record its new checksum, as a consistent but foreign file would be."""
    import hashlib
    meta = json.loads((model / "metadata.json").read_text())
    entry = meta["artefacts"][name]
    (model / entry["file"]).write_bytes(data)
    entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (model / "metadata.json").write_text(json.dumps(meta))


@slow
@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "params truncated"])
def test_a_tampered_or_truncated_artefact_fails_with_a_clear_message(e2e, tmp_path, damage):
    model = _copy(e2e, tmp_path)
    name = "params.npz" if damage.startswith("params") else "projection.jaxexport"
    data = bytearray((model / name).read_bytes())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 3]
    (model / name).write_bytes(bytes(data))
    with pytest.raises(ExportError) as e:
        Predictor(model)
    msg = str(e.value)
    assert "sha256" in msg and name in msg and "re-export" in msg and f"--run {e2e['run_dir']}" in msg, msg


@slow
def test_an_undecodable_artefact_or_one_outside_the_compatibility_window_says_to_re_export(e2e, tmp_path):
    from jax import export as jex

    model = _copy(e2e, tmp_path)
    good = (model / "projection.jaxexport").read_bytes()
    # garbage with a matching checksum: the deserialization error is wrapped
    _set_artefact(model, "projection", b"\x00" * 64 + good[64:200])
    with pytest.raises(ExportError, match=r"cannot load projection\.jaxexport \(exported with jax .*re-export"):
        Predictor(model)
    # a calling convention newer than this jax runs: outside jax's compatibility window
    exp = jex.deserialize(bytearray(good))
    newer = dataclasses.replace(exp, calling_convention_version=jex.maximum_supported_calling_convention_version + 1)
    _set_artefact(model, "projection", bytes(newer.serialize()))
    with pytest.raises(ExportError, match="outside jax's compatibility window.*re-export"):
        Predictor(model)
    # a format this iepjax does not read
    meta = json.loads((model / "metadata.json").read_text())
    (model / "metadata.json").write_text(json.dumps(dict(meta, format_version=99)))
    with pytest.raises(ExportError, match="format version 99.*re-export"):
        Predictor(model)
    (model / "metadata.json").unlink()
    with pytest.raises(ExportError, match="no metadata.json"):
        Predictor(model)


@slow
def test_predict_py_reports_an_unusable_model_folder_with_status_2(e2e, tmp_path, capsys):
    import runpy
    model = _copy(e2e, tmp_path)
    data = (model / "recon.jaxexport").read_bytes()
    (model / "projection.jaxexport").write_bytes(data)  # another program under the projection's name
    main = runpy.run_path(str(ROOT / "predict.py"), run_name="predict_script")["main"]
    code = main(["--model", str(model), str(e2e["images"]), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "sha256" in err and "re-export" in err and "Traceback" not in err, err


@slow
def test_the_predict_benchmark_runs_and_agrees_with_project_py(e2e, tmp_path):
    """benchmarks/predict.py on the tiny run: one JSON row; its maps of all test images equal project.py's."""
    r = _run(["benchmarks/predict.py", "--run", str(e2e["run_dir"]), "--work", str(tmp_path),
              "--tfds-dir", str(e2e["tfds"])], e2e["env"])
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["images"] == 48 and row["training_modules_imported"] == [] and row["devices"] == 2
    assert row["predict_py_s"] > 0 and row["steady_per_image_s"] > 0 and row["load_s"] > 0
    assert row["max_abs_diff_vs_project"] <= 1e-5 and row["labels_agree"] == "48/48"
