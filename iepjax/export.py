"""Export a trained run as one self-contained folder that `iepjax.Predictor` runs with jax and numpy only.

The folder (format version `predictor.FORMAT_VERSION`)::

    metadata.json          configs, preprocessing, thresholds, normalisation, metrics, versions, checksums
    MODEL_CARD.md          what the model detects, how it was evaluated, what the thresholds mean, limits
    params.npz             the trained parameters, one array per leaf (names in metadata.json)
    projection.jaxexport   jax.export: (params, x0 f32[b, S, S, C]) -> (x_T, maps f32[b, S, S], energies f32[b, T])
    recon.jaxexport        jax.export: (params, x0 f32[b, S, S, C]) -> (f(x0), reconstruction-error maps f32[b, S, S])

The programs are the ones project.py runs (docs/method.md, Projection and Anomaly maps): the
projection is `projection.project_image` vmapped over the batch, T gradient steps in one
`lax.scan`, with the run's projection settings (early-stop loss resolved); the batch dimension
`b` is symbolic, so any batch size runs. They are lowered for several platforms at once
(`DEFAULT_PLATFORMS`, those the installed jax can lower for).

Parameters are stored beside the programs and passed as arguments rather than baked in as
constants: the programs are then exactly the jitted functions of project.py, whose parameters
are arguments too (the same HLO, so the same numbers); one copy of the weights serves both
programs; XLA does not constant-fold megabytes of weights at every compile; and the weights are
checked by their own sha256 like the programs.
"""
from __future__ import annotations

import dataclasses
import datetime
import io
import json
import os
import platform as _platform
import shlex
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from iepjax.config import MapConfig, ProjectionConfig, ThresholdConfig, TrainConfig, to_dict
from iepjax.data.layout import WINDOW_QUANTILES
from iepjax.predictor import (CARD_FILE, FORMAT, FORMAT_VERSION, METADATA_FILE, NORMALISATION, PARAMS_FILE,
                              PROGRAM_FILES)
from iepjax.report import image_score_name
from iepjax.runs import atomic_write_bytes, atomic_write_text, read_json

DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")


# --------------------------------------------------------------------------- reading the run (the adapter)


class RunContents(NamedTuple):
    """Everything an export takes from a run folder (`read_run`).

    thresholds: {"source", "pixel_quantile", "image_quantile", "n_images", "grad": NormalStats dict,
    "recon": NormalStats dict}; metrics: the projection's metrics.json (None without one);
    projection_dir: the projection folder the thresholds and metrics came from (None: the run's
    own thresholds.json); holdout: the run's holdout.json (dataset, category, ids, source_dir).
    """

    run_dir: Path
    params: dict
    train_config: TrainConfig
    projection: ProjectionConfig
    preprocess: dict
    thresholds: dict
    metrics: dict | None
    projection_dir: Path | None
    holdout: dict
    training: dict
    dataset: str
    category: str


EXPORTED_SCORES = ("max", "topk")  # the image scores the predictor computes (`predictor.image_score`)


def check_paper_map(stored: dict, where: Path) -> dict:
    """The image score of thresholds fitted for the exported map: {"image_score": "max"} or {"image_score":
    "topk", "topk_frac": f}. The exported programs give the paper's map (docs/method.md, Anomaly maps) and
    the predictor scores images by its maximum or the mean of its top pixels, so thresholds of a
    normal-calibrated map or another image score would not apply (ValueError)."""
    m = stored.get("map") or {}
    kind, score = m.get("kind", "paper"), m.get("image_score", "max")
    if (kind != "paper" or score not in EXPORTED_SCORES
            or any((stored.get(r) or {}).get("map_fit") for r in ("grad", "recon"))):
        raise ValueError(f"the thresholds in {where} are for the {kind} map with the {score} image score; export.py "
                         "exports the paper's map scored by its maximum or its top pixels: project with --map paper "
                         "--image-score topk (or max) first (or pick such a projection with --projection)")
    # a record without the fraction predates it: the MapConfig default of then
    return {"image_score": "topk", "topk_frac": float(m.get("topk_frac", 0.005))} if score == "topk" \
        else {"image_score": "max"}


def read_run(*, category: str | None = None, dataset: str = "textures", results: str | os.PathLike = "results",
             run: str | os.PathLike | None = None, data_dir: str | None = None, tfds_dir: str | None = None,
             projection: str | None = "latest", batch_size: int = 16, progress: bool = True, model: str = "vae",
             allow_collapse: bool = False, normal_dir: str | os.PathLike | None = None) -> RunContents:
    """The run folder's checkpoint, configs, preprocessing, thresholds and metrics, for `export_run`.

    This is the only function of the module that calls the training pipeline (run folders,
    checkpoints, presets, threshold calibration), so that a change there is met here:
    `iepjax.data.dataset_and_source`, `iepjax.runs.find_run`, `iepjax.training.load_params`,
    `iepjax.data.preprocess.Preprocess.load`, `iepjax.config.from_dict`, the run folder's
    holdout.json, training.json and thresholds.json, a projection folder's thresholds.json
    and metrics.json and, when the run has no stored thresholds, `iepjax.thresholds`'
    `thresholds.held_out_images`, `presets.projection_config`, `thresholds.load_or_resolve`,
    `early_stop.with_early_stop` and `thresholds.load_or_calibrate`
    (which store them in the run folder, as project.py does).

    run: a run folder or a v<N> name (default: the category's latest run of `model`); projection:
    "latest", a v<N> name under <run>/projections, or None to use the run's own thresholds.json
    (fitted on the held-out normal images for the projection settings of its last calibration).
    A run whose model collapsed to the mean image is refused (`runs.CollapsedRun`, before any
    work) unless `allow_collapse`: its programs would flag nothing, or everything.
    normal_dir: a folder of normal images taken as the production images are; the thresholds are
    fitted again on them (`thresholds.normal_folder_images`, `thresholds.calibrate`, the same
    projection settings, quantiles and image score), as project.py's --normal-dir does, and the
    projection's metrics at the old thresholds (F1, false-alarm rates) are left out.
    """
    from iepjax import runs
    from iepjax.config import from_dict
    from iepjax.data import dataset_and_source
    from iepjax.data.preprocess import Preprocess
    from iepjax.training import load_params

    dataset, source_dir = dataset_and_source(dataset, data_dir, None)
    if run is not None and (Path(run) / "checkpoints").is_dir():
        run_dir = Path(run).resolve()
    else:
        if category is None:
            raise ValueError("give the category (or a run folder)")
        run_dir = runs.find_run(results, model, dataset, category, None if run is None else str(run))
    runs.check_trained(run_dir, category or run_dir.parent.name, allow_collapse=allow_collapse)
    params, tcfg = load_params(run_dir)
    prep = Preprocess.load(run_dir) or Preprocess(kind="object", size=tcfg.model.size)  # older runs: resized
    holdout = read_json(run_dir / "holdout.json") or {}
    dataset = holdout.get("dataset", dataset)
    category = holdout.get("category", category)
    training = read_json(run_dir / "training.json") or {}
    proj_dir = None
    if projection is not None:
        cand = run_dir / "projections" / projection
        if cand.is_dir() and (cand / "thresholds.json").is_file():
            proj_dir = cand.resolve()
        elif projection != "latest":
            raise FileNotFoundError(f"no projection {projection!r} with a thresholds.json under {run_dir / 'projections'}")
    metrics = None
    if proj_dir is not None:  # what project.py evaluated: its settings, thresholds and metrics
        stored = read_json(proj_dir / "thresholds.json")
        metrics = read_json(proj_dir / "metrics.json")
        th = {"source": stored.get("source", "held-out normal training images"),
              "grad": stored["grad"], "recon": stored["recon"]}
        config = from_dict(ProjectionConfig, stored["projection"])
    elif (run_dir / "thresholds.json").is_file():  # fitted by train.py / project.py for its settings
        stored = read_json(run_dir / "thresholds.json")
        th = {"source": "held-out normal training images", "grad": stored["grad"], "recon": stored["recon"]}
        config = from_dict(ProjectionConfig, stored["projection"])
    else:  # nothing stored: fit them as project.py would (the preset's settings, early stop)
        from iepjax import presets, thresholds
        from iepjax.early_stop import with_early_stop
        normal = thresholds.held_out_images(run_dir, dataset, category, tfds_dir,
                                            source_dir=source_dir or holdout.get("source_dir"))
        config = presets.projection_config(dataset, category, tcfg.model.likelihood, size=tcfg.model.size)
        config, _ = thresholds.load_or_resolve(run_dir, params, dataclasses.replace(config, model=tcfg.model), normal)
        config = with_early_stop(params, config, normal, Preprocess.load(run_dir))
        stats, _ = thresholds.load_or_calibrate(run_dir, params, config, normal, batch_size=batch_size,
                                                progress=progress)
        th = {"source": "held-out normal training images", **{k: v._asdict() for k, v in stats.items()}}
    if proj_dir is not None or (run_dir / "thresholds.json").is_file():
        th["score"] = check_paper_map(stored, proj_dir or run_dir)
    else:  # fitted just now, with the default map and image score
        th["score"] = check_paper_map({"map": ThresholdConfig().map.score_record()}, run_dir)
    config = dataclasses.replace(config, model=tcfg.model)
    if normal_dir is not None:
        th, metrics = _fit_on_folder(params, config, prep, th, metrics, normal_dir, batch_size, progress)
    g = th["grad"]
    th.update(pixel_quantile=g["pixel_quantile"], image_quantile=g["image_quantile"], n_images=g["n_images"])
    return RunContents(run_dir, params, tcfg, config, prep.to_dict(), th, metrics, proj_dir, holdout, training,
                       dataset, category)


FOLDER_SOURCE = "normal images in"  # in thresholds.source after a fit on a folder ("<n> normal images in <dir>")
AT_THRESHOLDS = ("pixel_f1", "image_f1", "pixel_fpr_good_test", "image_fpr_good_test", "pixel_threshold",
                 "image_threshold")  # the metrics that depend on the thresholds they were measured at


def _fit_on_folder(params: dict, config: ProjectionConfig, prep, th: dict, metrics: dict | None,
                   normal_dir: str | os.PathLike, batch_size: int, progress: bool) -> tuple[dict, dict | None]:
    """`th` fitted again on the normal images of `normal_dir` at its quantiles and image score, and
    `metrics` without what was measured at the old thresholds (`read_run`'s normal_dir)."""
    from iepjax import thresholds

    g = th["grad"]
    score = dict(th["score"])
    cfg = ThresholdConfig(pixel_quantile=g["pixel_quantile"], image_quantile=g["image_quantile"],
                          map=MapConfig(kind="paper", **score))
    images = thresholds.normal_folder_images(normal_dir, config.model.channels, prep.intensity_window,
                                             image_quantile=cfg.image_quantile)
    stats, _ = thresholds.calibrate(params, config, images, cfg, prep=prep, batch_size=batch_size, progress=progress)
    th = {"source": f"{len(images)} {FOLDER_SOURCE} {Path(normal_dir).resolve()}", "score": score,
          **{row: st._asdict() for row, st in stats.items()}}
    if metrics is not None:
        metrics = {k: ({m: v for m, v in row.items() if m not in AT_THRESHOLDS} if k in ("grad", "recon") else row)
                   for k, row in metrics.items()}
    return th, metrics


# --------------------------------------------------------------------------- the programs


def projection_program(config: ProjectionConfig) -> Callable:
    """(params, x0 (B, S, S, C)) -> (x_T (B, S, S, C), maps (B, S, S), energies (B, T)): project.py's
    batch program (`projection.project_image` vmapped; docs/method.md, Projection)."""
    from iepjax.projection import project_image

    def program(params: dict, x0_BxSxSxC: jax.Array):
        r = jax.vmap(project_image, in_axes=(None, 0, None))(params, x0_BxSxSxC, config)
        return r.x_T, r.maps, r.energies
    return program


def recon_program(config: ProjectionConfig) -> Callable:
    """(params, x0 (B, S, S, C)) -> (f(x0) (B, S, S, C), recon maps mean_c |x0 - f(x0)| (B, S, S)):
    the plain autoencoder map of docs/method.md, Anomaly maps (the recon row of `iepjax.localization`)."""
    from iepjax.anomaly_maps import recon_map
    from iepjax.energy import reconstruct

    def program(params: dict, x0_BxSxSxC: jax.Array):
        f = jax.vmap(reconstruct, in_axes=(None, 0, None))(params, x0_BxSxSxC, config)
        m = jax.vmap(recon_map, in_axes=(None, 0, None))(params, x0_BxSxSxC, config)
        return f, m
    return program


def per_platform(build: Callable[[ProjectionConfig], Callable], config: ProjectionConfig,
                 platforms: Sequence[str]) -> tuple[Callable, dict]:
    """The program to lower for `platforms`, and the convolution formulation each platform gets.

    THE one place where the exported program chooses per platform: `jax.lax.platform_dependent`
    picks the model's XLA:CPU formulation (`iepjax.xla_cpu_convs`) on CPU and flax's plain
    convolutions everywhere else, as `iepjax.model.resolve_conv("auto")` does for project.py on
    each platform. Each branch is traced under its setting (`iepjax.model.using_conv`); lowered
    for one platform only that branch is emitted, for several the program switches on the
    platform it is compiled for. Both formulations take the same parameters.
    """
    from iepjax.model import using_conv

    choice = {p: "xla_cpu" if p == "cpu" else "plain" for p in platforms}

    def under(conv: str) -> Callable:
        def branch(*args):
            with using_conv(conv):
                return build(config)(*args)
        return branch

    def program(*args):
        return jax.lax.platform_dependent(*args, cpu=under("xla_cpu"), default=under("plain"))
    return program, choice


def without_dead_code(fn: Callable, *arg_specs) -> Callable:
    """`fn` traced at arg_specs with its unused computations removed (its outputs unchanged).

    Why: the model's XLA:CPU convolutions (custom VJPs) also return the kernel's gradient, which
    the projection never uses. Under `vmap` that gradient is computed per image as a convolution
    with feature_group_count = batch; XLA drops it when it compiles a fixed batch, but with a
    symbolic batch the convolution cannot even be lowered. Dead-code elimination of the traced
    jaxpr (jax's own `dce_jaxpr`, which recurses into scan and cond bodies) removes it first.
    """
    from jax._src.interpreters import partial_eval as pe  # no public DCE entry point in jax 0.10
    from jax.extend.core import ClosedJaxpr, jaxpr_as_fun

    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*arg_specs)
    jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars), instantiate=True)
    flat_fn = jaxpr_as_fun(ClosedJaxpr(jaxpr, closed.consts))
    out_tree = jax.tree.structure(out_shape)

    def clean(*args):
        return jax.tree.unflatten(out_tree, flat_fn(*jax.tree.leaves(args)))
    return clean


def _export(fn: Callable, arg_specs, platforms: Sequence[str]) -> tuple[object, dict]:
    """jax.export of jit(fn) for as many of `platforms` as lower; ({platform: reason} of the others)."""
    from jax import export as jex

    try:
        return jex.export(jax.jit(fn), platforms=tuple(platforms))(*arg_specs), {}
    except Exception as first:
        if len(platforms) == 1:
            raise
        ok, skipped = [], {}
        for p in platforms:
            try:
                jex.export(jax.jit(fn), platforms=(p,))(*arg_specs)
                ok.append(p)
            except Exception as e:
                skipped[p] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        if not ok or "cpu" not in ok and "cpu" in platforms:
            raise first
        return jex.export(jax.jit(fn), platforms=tuple(ok))(*arg_specs), skipped


def flat_params(params: dict) -> tuple[list[str], list[np.ndarray]]:
    """(names "params/encoder/Conv_0/kernel", arrays) of a parameter tree, in its leaf order."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    names = ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) for path, _ in leaves]
    return names, [np.asarray(a) for _, a in leaves]


def export_programs(params: dict, config: ProjectionConfig, platforms: Sequence[str] = DEFAULT_PLATFORMS
                    ) -> tuple[dict, dict, dict]:
    """({"projection", "recon"} -> jax.export.Exported, {platform: reason not lowered}, {platform: conv formulation}).

    Each program takes (the parameter arrays as a list in `flat_params` order, x0 f32[b, S, S, C]).
    """
    from jax import export as jex

    names, arrays = flat_params(params)
    tree = jax.tree.structure(params)
    m = config.model
    out, skipped, formulation = {}, {}, {}
    for name, build in (("projection", projection_program), ("recon", recon_program)):
        program, formulation = per_platform(build, config, platforms)

        def from_flat(flat, x0, program=program):
            return program(jax.tree.unflatten(tree, flat), x0)
        b, = jex.symbolic_shape("b")  # the batch: any size >= 1
        specs = ([jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays],
                 jax.ShapeDtypeStruct((b, m.size, m.size, m.channels), jnp.float32))
        out[name], skip = _export(without_dead_code(from_flat, *specs), specs, platforms)
        skipped.update(skip)
    return out, skipped, {p: f for p, f in formulation.items() if p not in skipped}


# --------------------------------------------------------------------------- the folder


def export_run(out_dir: str | os.PathLike, *, platforms: Sequence[str] = DEFAULT_PLATFORMS, **run_args) -> Path:
    """Export a run (found by `read_run(**run_args)`) into out_dir; returns out_dir.

    Writes params.npz, projection.jaxexport, recon.jaxexport, MODEL_CARD.md and, last,
    metadata.json (module docstring). The metadata records the command that re-exports the same
    run (absolute paths), which the predictor's errors name.
    """
    run = read_run(**run_args)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = out_dir / METADATA_FILE  # an interrupted export must not pass for a complete one
    if stale.exists():
        stale.unlink()
    programs, skipped, formulation = export_programs(run.params, run.projection, platforms)
    names, arrays = flat_params(run.params)
    buf = io.BytesIO()
    np.savez(buf, **dict(zip(names, arrays)))
    atomic_write_bytes(out_dir / PARAMS_FILE, buf.getvalue())
    artefacts = {"params": {"file": PARAMS_FILE, **_digest(buf.getvalue()), "names": names,
                            "shapes": [list(a.shape) for a in arrays], "dtypes": [str(a.dtype) for a in arrays],
                            "count": int(sum(a.size for a in arrays))}}
    for name, exp in programs.items():
        data = bytes(exp.serialize())
        atomic_write_bytes(out_dir / PROGRAM_FILES[name], data)
        artefacts[name] = {"file": PROGRAM_FILES[name], **_digest(data), "platforms": list(exp.platforms),
                           "calling_convention_version": exp.calling_convention_version,
                           "inputs": _PROGRAM_IO[name][0], "outputs": _PROGRAM_IO[name][1],
                           "in_avals": [str(a) for a in exp.in_avals], "out_avals": [str(a) for a in exp.out_avals]}
    args = ["--run", str(run.run_dir), "--out", str(out_dir.resolve())]
    if run.projection_dir is not None:
        args += ["--projection", run.projection_dir.name]
    elif run_args.get("projection", "latest") is None:
        args += ["--projection", "none"]
    if tuple(platforms) != DEFAULT_PLATFORMS:
        args += ["--platforms", ",".join(platforms)]
    if run_args.get("allow_collapse"):
        args += ["--allow-collapse"]
    if run_args.get("normal_dir") is not None:
        args += ["--normal-dir", str(Path(run_args["normal_dir"]).resolve())]
    command = "python export.py " + " ".join(shlex.quote(a) for a in args)
    meta = metadata(run, artefacts, list(programs["projection"].platforms), skipped, formulation, command)
    atomic_write_text(out_dir / CARD_FILE, model_card(meta))
    atomic_write_text(out_dir / METADATA_FILE, json.dumps(meta, indent=2))
    return out_dir


def _digest(data: bytes) -> dict:
    import hashlib
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


_PROGRAM_IO = {
    "projection": (["params: the arrays of params.npz, as a list in artefacts.params.names order",
                    "x0: float32[b, S, S, C], images in [0, 1] (uint8 / 255), b any size >= 1"],
                   ["x_T: float32[b, S, S, C], the projected images",
                    "maps: float32[b, S, S], mean over channels of |x_T - x0|, Gaussian-smoothed (projection.smoothing_sigma)",
                    "energies: float32[b, T], the energy E(x_t) at each of the T steps"]),
    "recon": (["params: as for the projection", "x0: float32[b, S, S, C] in [0, 1]"],
              ["recon: float32[b, S, S, C], f(x0) = sigmoid(decode(mu(x0)))",
               "maps: float32[b, S, S], mean over channels of |x0 - f(x0)|, Gaussian-smoothed"]),
}


def preprocessing_metadata(prep, channels: int) -> dict:
    """metadata.json's "preprocessing" of a run preprocessed by `prep` (an
    `iepjax.data.preprocess.Preprocess`): every field that decides the model inputs
    (`predictor.preprocess_from_metadata` reads them back), and how, in words."""
    s = prep.size
    if prep.kind == "object":
        how = f"the whole image resized to {s}x{s} (bilinear, anti-aliased); the map resized back to the image's size"
    else:
        if prep.pixel_scale:
            scale = (f"the image resized by {prep.pixel_scale:.6g} (the training images' scale: their median short side "
                     f"brought to {s / prep.texture_fov:g} px, size / texture_fov"
                     + ("" if prep.upsample else ", never upsampled") + "), whatever its size")
        else:
            scale = (f"the image resized so that its short side is {s / prep.texture_fov:g} px (size / texture_fov, the "
                     "training scale)" + ("" if prep.upsample else ", or kept at its own resolution when that is "
                                                                    "smaller (never upsampled)"))
        how = (f"{scale}, cut into {s}x{s} tiles at stride {prep.stride} (the last row and column aligned to "
               "the border), each tile projected, the tile maps blended where they overlap (weights: distance from the "
               "tile border, iepjax.data.preprocess.tile_weights) and the map resized back to the image's size")
    return {"kind": prep.kind, "size": s, "channels": channels,
            "texture_fov": prep.texture_fov, "tile_stride": prep.stride, "upsample": prep.upsample,
            "pixel_scale": prep.pixel_scale,
            "intensity_window": None if prep.intensity_window is None else list(prep.intensity_window),
            "working_short_side": None if prep.kind == "object" else s / prep.texture_fov,
            "blending": None if prep.kind == "object" else "linear ramp from each tile's border (0.5) to its centre",
            "input": "uint8 image, gray or RGB as the model (PIL's L / RGB conversion), / 255 to float32"
                     + ("" if prep.intensity_window is None else
                        f"; a high-depth gray image (16-bit, 32-bit or float) first mapped to uint8 by "
                        f"round(255 (v - {prep.intensity_window[0]:g}) / ({prep.intensity_window[1]:g} - "
                        f"{prep.intensity_window[0]:g})), clipped (intensity_window: the training images' "
                        f"{100 * WINDOW_QUANTILES[0]:g} % and {100 * WINDOW_QUANTILES[1]:g} % quantiles)"),
            "how": how}


def metadata(run: RunContents, artefacts: dict, platforms: list[str], skipped: dict, formulation: dict,
             command: str) -> dict:
    """The metadata.json of an export (schema: format_version `predictor.FORMAT_VERSION`)."""
    import jaxlib

    from iepjax import __version__
    from iepjax.data.preprocess import Preprocess
    from jax import export as jex

    prep = Preprocess(**run.preprocess)
    cfg = run.projection
    th = run.thresholds
    g, r = th["grad"], th["recon"]
    n_hold = len(run.holdout.get("ids", [])) or th["n_images"]
    folder = FOLDER_SOURCE in th["source"] and not th["source"].startswith("given")
    fitted_on = th["source"][th["source"].index(FOLDER_SOURCE):] if folder else "held-out normal images"
    early = (f"stop_loss = {cfg.stop_loss:.9g}: the smallest model loss L_r of the run's {n_hold} held-out normal images; "
             "an image stops moving from the first step at which its L_r(x_t) <= stop_loss") \
        if cfg.stop_loss is not None else "none: every image takes all T steps"
    metrics = None
    if run.metrics is not None:
        keep = ("pixel_auroc", "image_auroc", "pixel_aupro", "pixel_f1", "image_f1", "pixel_fpr_good_test",
                "image_fpr_good_test", "pixel_threshold", "image_threshold")
        metrics = {row: {k: run.metrics[row][k] for k in keep if k in run.metrics.get(row, {})} for row in ("grad", "recon")}
        metrics["n_test_images"] = (run.metrics.get("protocol") or {}).get("n_images")
        metrics["maps"] = (run.metrics.get("protocol") or {}).get("maps", "model size")
        if run.metrics.get("per_kind"):
            metrics["per_kind_pixel_auroc"] = {k: v["grad"]["pixel_auroc"] for k, v in run.metrics["per_kind"].items()}
        metrics["projection_dir"] = str(run.projection_dir)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "created_by": {"iepjax": __version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                       "python": _platform.python_version(), "numpy": np.__version__},
        "source": {"run_dir": str(run.run_dir), "dataset": run.dataset, "category": run.category,
                   "projection_dir": None if run.projection_dir is None else str(run.projection_dir),
                   "reexport_command": command},
        "training": {"dataset": run.dataset, "category": run.category, "data_source": run.holdout.get("source_dir"),
                     "held_out_normal_images": n_hold, "held_out_fraction": run.holdout.get("fraction"),
                     "config": to_dict(run.train_config), "summary": run.training},
        "model": to_dict(cfg.model),
        "projection": {**to_dict(cfg), "early_stop": early},
        "preprocessing": preprocessing_metadata(prep, cfg.model.channels),
        "thresholds": {"source": th["source"], "n_images": th["n_images"],
                       "pixel_threshold": g["pixel_threshold"], "image_threshold": g["image_threshold"],
                       "pixel_quantile": th["pixel_quantile"], "image_quantile": th["image_quantile"],
                       "vmax": g.get("vmax"),
                       "meaning": (f"pixel: the {th['pixel_quantile']} quantile of the anomaly-map pixels of the "
                                   f"{th['n_images']} {fitted_on}; image: the {th['image_quantile']} quantile "
                                   f"of their image scores ({image_score_name(th['score'])}, on the map at the model size)"
                                   + ("; replaced by the values given to project.py" if th["source"].startswith("given")
                                      else "")),
                       "pixel_quantiles": g.get("pixel_quantiles"), "image_quantiles": g.get("image_quantiles"),
                       "recon": {k: r.get(k) for k in ("pixel_threshold", "image_threshold", "vmax")}},
        "scores": {"image_score": f"{image_score_name(th['score'])}, on the anomaly map resized from the stitched "
                                  f"working resolution to {prep.size}x{prep.size} (the scale the image threshold was fitted at, as project.py's "
                                  "scores.csv)", "rule": th["score"],
                   "label": "1 if image_score >= thresholds.image_threshold",
                   "mask": "anomaly map at the original size >= thresholds.pixel_threshold"},
        "normalisation": {"formula": "s / (s + t)", "t": g["image_threshold"], "text": NORMALISATION,
                          "properties": "monotone; s = 0 -> 0, s = t -> 0.5, s -> infinity -> 1; "
                                        "n >= 0.5 exactly when the label is 1; s = t n / (1 - n)"},
        "metrics": metrics,
        "platforms": platforms,
        "not_lowered": skipped,
        "conv_formulation": formulation,
        "compatibility": {"calling_convention_version": artefacts["projection"]["calling_convention_version"],
                          "exporter_supports": [jex.minimum_supported_calling_convention_version,
                                                jex.maximum_supported_calling_convention_version],
                          "note": "jax.export artefacts run on jax versions whose calling-convention window includes "
                                  "this version (jax keeps about 6 months of backward compatibility); outside it, "
                                  "re-export from the run folder"},
        "artefacts": artefacts,
    }


def model_card(meta: dict) -> str:
    """MODEL_CARD.md: a short human-readable account of an export's metadata."""
    src, th, pre, m = meta["source"], meta["thresholds"], meta["preprocessing"], meta["model"]
    tr = meta["training"]
    lines = [f"# Anomaly localisation model: {src['dataset']} / {src['category']}", "",
             "## What it does",
             f"Finds defects in {'gray' if m['channels'] == 1 else 'RGB'} images of **{src['category']}** that look "
             f"unlike the normal images it was trained on. A VAE trained on normal images only (latent {m['latent']}, "
             f"{m['decoder']} decoder, {m['likelihood']} likelihood); each image is projected onto what the model "
             f"considers normal by {meta['projection']['steps']} gradient steps on an energy (Dehaene et al., ICLR 2020; "
             "docs/method.md), and the anomaly map is how much each pixel had to change.", "",
             f"Preprocessing: {pre['how']}.", "",
             "## How it was evaluated"]
    met = meta.get("metrics")
    if met:
        gm = met["grad"]
        lines.append(f"On the {met.get('n_test_images') or 'held-out'} test images of {src['dataset']}/{src['category']} "
                     f"(maps at {met.get('maps')}): pixel AUROC {gm.get('pixel_auroc', float('nan')):.3f}, image AUROC "
                     f"{gm.get('image_auroc', float('nan')):.3f}, AU-PRO@0.3 {gm.get('pixel_aupro', float('nan')):.3f}"
                     + (f"; at the thresholds below, pixel F1 {gm['pixel_f1']:.3f}, image F1 "
                        f"{gm.get('image_f1', float('nan')):.3f}, false alarms on good test images "
                        f"{gm.get('image_fpr_good_test', float('nan')):.3f}." if "pixel_f1" in gm else
                        " (the thresholds below were fitted after that evaluation: F1 and false alarms at them "
                        "were not measured)."))
    else:
        lines.append("Not evaluated on a test set before export (no projection of the run): run project.py on the "
                     "run, then export again, to have metrics here.")
    lines += ["", "## Thresholds and scores",
              f"Thresholds come from {th['source']} ({th['n_images']} images never used for training): the pixel "
              f"threshold {th['pixel_threshold']:.4g} is the {th['pixel_quantile']} quantile of their map values, the "
              f"image threshold {th['image_threshold']:.4g} the {th['image_quantile']} quantile of their image scores. "
              f"So about {100 * (1 - th['image_quantile']):.2g}% of normal images are flagged (false alarms) by design.",
              "",
              f"Image score: {meta['scores']['image_score']}. Normalised score: s / (s + t) with t the image "
              "threshold: 0.5 at the threshold, higher is more anomalous; the raw score is reported beside it. "
              "Mask: map >= the pixel threshold.", "",
              "## Limits",
              f"- Trained on {tr['dataset']}/{tr['category']} only: other products, lighting, scales or camera "
              "set-ups give meaningless scores.",
              ("- Thresholds rest on a few held-out normal images: check the false-alarm rate on your own good parts."
               if FOLDER_SOURCE not in th["source"] else
               f"- Thresholds rest on {th['n_images']} normal images: {100 * (1 - th['image_quantile']):.2g}% false "
               "alarms is what they promise for parts imaged as those were."),
              "- The map marks where the image differs from the model's idea of normal, not what the defect is; "
              "small, low-contrast defects can be missed.",
              f"- Runs with jax versions whose jax.export window covers calling convention "
              f"{meta['compatibility']['calling_convention_version']} (exported with jax "
              f"{meta['created_by']['jax']}); otherwise re-export: `{src['reexport_command']}`.",
              f"- Lowered for: {', '.join(meta['platforms'])}.", ""]
    return "\n".join(lines)
