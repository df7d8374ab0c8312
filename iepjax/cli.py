"""What the command-line scripts share: argparse types, flag groups, exit codes, and the steps
between flags and a library call (configs from flags, the runtime, errors a user can act on).

train.py, project.py and reproduce.py parse flags, build configs with these helpers (presets
changed by `dataclasses.replace`), start the runtime and make one `iepjax.pipelines` call.

Imports nothing but the standard library at import time: the benchmark scripts load this file
by path under a PyTorch-only interpreter, where the iepjax package (jax) cannot be imported. The
functions for the iepjax scripts import the package when they are called.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable

# Exit statuses of the scripts.
EXIT_OK = 0
EXIT_FAILED = 1  # training diverged, the model's losses are not finite, or (reproduce --keep-going) a category failed
EXIT_ERROR = 2  # bad flags (argparse exits with 2 too), data or run folder; reproduce stopped by an error
EXIT_COLLAPSED = 3  # the model collapsed to predicting the mean image (train.py; project.py without --allow-collapse)
EXIT_PARTIAL = 4  # project.py --input-dir: some input files could not be read (the others were processed)


def _int(text: str, least: int) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < least:
        raise argparse.ArgumentTypeError(f"{n}: give {least} or more")
    return n


def positive_int(text: str) -> int:
    """argparse type for counts such as --cpu-devices or --steps: an int >= 1, else a usage error naming the value."""
    return _int(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type for counts that may be 0, such as project.py --steps (T = 0 returns x0)."""
    return _int(text, 0)


def _float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number")
    return x


def positive_float(text: str) -> float:
    """argparse type for rates such as --lr: a finite number > 0."""
    x = _float(text)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"{x}: give a number above 0")
    return x


def nonnegative_float(text: str) -> float:
    """argparse type for weights and widths that may be 0, such as --alpha, --lam, --sigma."""
    x = _float(text)
    if x < 0:
        raise argparse.ArgumentTypeError(f"{x}: give 0 or more")
    return x


def quantile(text: str) -> float:
    """argparse type for a quantile q in (0, 1], such as --pixel-quantile 0.995."""
    x = _float(text)
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"{x}: a quantile is in (0, 1], e.g. 0.995")
    return x


def fraction(text: str) -> float:
    """argparse type for a share in [0, 1), such as train.py --holdout 0.1."""
    x = _float(text)
    if not 0 <= x < 1:
        raise argparse.ArgumentTypeError(f"{x}: give a fraction in [0, 1), e.g. 0.1")
    return x


def unit_fraction(text: str) -> float:
    """argparse type for a share in (0, 1], such as train.py --texture-fov 0.25."""
    x = _float(text)
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"{x}: give a fraction in (0, 1], e.g. 0.25")
    return x


def model_size(text: str) -> int:
    """argparse type for a model input size (train.py --size, reproduce.py --image-size): ModelConfig's rule."""
    n = _int(text, 1)
    from iepjax.config import SIZE_RULE, size_ok  # the rule lives with ModelConfig
    if not size_ok(n):
        raise argparse.ArgumentTypeError(f"{n}: {SIZE_RULE}")
    return n


# --------------------------------------------------------------------------- flag groups


def add_data_flags(p: argparse.ArgumentParser, *, one_category: bool = True) -> None:
    """Where the images come from and where runs go (`data_config`); --dataset and --category
    unless the script takes several categories."""
    if one_category:
        p.add_argument("--dataset", default="textures", help="dataset name (built-in: textures)")
        p.add_argument("--category", required=True, help="category, e.g. brick or grass")
    p.add_argument("--tfds-dir", default=None,
                   help="where TFDS keeps prepared data (default $IEPJAX_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--results", default="results", help="root of the run folders")
    p.add_argument("--data-dir", default=None,
                   help="your own images in the MVTec AD layout: DIR/<category>/train/good/*, DIR/<category>/test/<kind>/*, "
                        "DIR/<category>/ground_truth/<kind>/*_mask.png (sets --dataset folder)")
    p.add_argument("--manual-dir", default=None,
                   help="MVTec AD: the download (extracted folder or mvtec_anomaly_detection.tar.xz); "
                        "needed the first time a category is prepared")


def add_threshold_flags(p: argparse.ArgumentParser) -> None:
    """The quantiles of the held-out normal images' scores that become the thresholds (`threshold_config`)."""
    p.add_argument("--pixel-quantile", type=quantile, help="quantile of normal pixel scores -> threshold (default 0.995)")
    p.add_argument("--image-quantile", type=quantile, help="quantile of normal image scores -> threshold (default 0.99)")


def add_projection_flags(p: argparse.ArgumentParser) -> None:
    """The projection's settings (`projection_settings`; docs/method.md, Projection) and the
    thresholds given instead of fitted (`threshold_config`)."""
    g = p.add_argument_group("projection (default: the category preset's; docs/calibration.md)")
    g.add_argument("--steps", type=nonnegative_int, help="projection steps T")
    g.add_argument("--alpha", type=nonnegative_float, help="step size as such (instead of --step)")
    g.add_argument("--lam", type=nonnegative_float, help="weight of the L1 prior ||x - x0||_1 as such (instead of --hold)")
    g.add_argument("--sigma", type=nonnegative_float,
                   help="Gaussian smoothing of the paper's maps, pixels (--map nce smooths with its own window)")
    g.add_argument("--hold", type=fraction,
                   help="lam in the model's own units: the fraction of held-out normal pixels the L1 prior keeps "
                        "at x0 (iepjax.loss_scale; the resolved lam is written to loss_scale.json; default: the "
                        "preset's)")
    g.add_argument("--step", type=positive_float,
                   help="alpha in the model's own units: a typical normal pixel's first step, in intensity units "
                        "(default: the preset's)")
    g.add_argument("--no-weighting", action="store_true", help="plain gradient step (the paper's ablation)")
    g.add_argument("--no-backtrack", action="store_true",
                   help="no safeguard: keep a step even when it raised the image's energy (the paper's plain loop)")
    g.add_argument("--no-kl", action="store_true", help="leave the KL term out of the energy")
    g.add_argument("--no-early-stop", action="store_true",
                   help="always take T steps (default: an image stops once its loss is as low as the lowest of the "
                        "run's held-out normal images)")
    g.add_argument("--threshold", type=nonnegative_float,
                   help="pixel threshold (default: fitted on the run's held-out normal images)")
    g.add_argument("--image-threshold", type=nonnegative_float,
                   help="image threshold (default: fitted); with --threshold, nothing is fitted")


def add_map_flags(p: argparse.ArgumentParser) -> None:
    """The anomaly map and image score that are scored and thresholded (`threshold_config`'s MapConfig;
    docs/method.md, Normal-calibrated maps)."""
    from iepjax.config import IMAGE_SCORES, MAP_KINDS
    p.add_argument("--map", dest="map_kind", choices=MAP_KINDS,
                   help="paper: the residual map smoothed by --sigma; nce: the raw residual map calibrated on the "
                        "run's held-out normal images (default: paper)")
    p.add_argument("--image-score", choices=IMAGE_SCORES,
                   help="max of the map (the paper's), topk (mean of the top --topk-frac of the pixels), smoothed_max "
                        "(max after a Gaussian of --smoothed-max-sigma px), area (fraction above the pixel threshold); "
                        "default: topk")
    p.add_argument("--topk-frac", type=unit_fraction,
                   help="topk: fraction of the pixels averaged (default 0.001 for --map paper, 0.005 for --map nce)")
    p.add_argument("--smoothed-max-sigma", type=positive_float, help="smoothed_max: Gaussian std in px (default 4)")


def map_config(args: argparse.Namespace):
    """The `MapConfig` of the flags of `add_map_flags` (`config.default_map` for those a script lacks or leaves out)."""
    from iepjax.config import MapConfig, default_map
    base = default_map(getattr(args, "map_kind", None) or MapConfig().kind)
    return override(base, image_score=getattr(args, "image_score", None), topk_frac=getattr(args, "topk_frac", None),
                    smoothed_max_sigma=getattr(args, "smoothed_max_sigma", None))


def add_output_flags(p: argparse.ArgumentParser, *, overlays: bool = True) -> None:
    """--no-progress (no progress bars) and, with `overlays`, --no-overlays (no per-image pictures,
    no iteration strip)."""
    if overlays:
        p.add_argument("--no-overlays", action="store_true",
                       help="no picture per image and no iteration strip (it projects a few images again)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_runtime_flags(p: argparse.ArgumentParser, *, multi_process: bool = True) -> None:
    """--cpu-devices and, with `multi_process`, --devices and the jax.distributed flags (`start_runtime`)."""
    g = p.add_argument_group("devices and processes (docs/scaling.md)")
    g.add_argument("--cpu-devices", type=positive_int, default=None,
                   help="on CPU: split the cores into this many JAX devices (default: one per core in a "
                        "single process, 1 per process with several; XLA:CPU runs each convolution on one "
                        "core, so one device per core is what uses them all)")
    if not multi_process:
        return
    g.add_argument("--devices", type=int, default=None,
                   help="devices to split each batch over, per process (default: all visible)")
    g.add_argument("--coordinator", default=None, help="host:port of process 0 (env JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, default=None, help="number of processes (env JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=None, help="this process, 0..N-1 (env JAX_PROCESS_ID)")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize and let JAX detect what is not given (SLURM, Open MPI, TPU)")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--model: which of the paper's models (vae, ae_l2, ae_ssim): train.py trains it, project.py
    projects its run (results/<model>/...)."""
    p.add_argument("--model", default="vae", choices=("vae", "ae_l2", "ae_ssim"),
                   help="vae (the method's model), ae_l2 (deterministic AE, summed squared error) or ae_ssim "
                        "(deterministic AE, 1 - SSIM loss); the energy is the model's own loss (default vae)")


def add_ablation_flags(p: argparse.ArgumentParser) -> None:
    """--gradient: the projection's gradient through the network (full, the paper) or with f(x) held
    constant (detached, as the public ports); the other ablations (--no-weighting, --no-kl,
    --no-early-stop) are the scripts' own flags."""
    p.add_argument("--gradient", choices=("full", "detached"), default=None,
                   help="full: grad E flows through the encoder and decoder (the paper; default); detached: f(x) held "
                        "constant, as the public ports (an ablation)")


# --------------------------------------------------------------------------- from flags to a library call


def override(config: Any, **fields: Any) -> Any:
    """`dataclasses.replace(config, ...)` with the fields whose flag was given (not None)."""
    return dataclasses.replace(config, **{k: v for k, v in fields.items() if v is not None})


def data_config(args: argparse.Namespace):
    """The `DataConfig` of the `add_data_flags` flags; --data-dir means dataset "folder" (ValueError
    when another dataset was asked for)."""
    from iepjax.config import DataConfig
    from iepjax.data import dataset_and_source
    dataset, source_dir = dataset_and_source(args.dataset, args.data_dir, args.manual_dir)
    return DataConfig(dataset, args.category, args.tfds_dir, source_dir)


def projection_settings(args: argparse.Namespace, config):
    """The `ProjectionConfig` `config` with the `add_projection_flags` flags (and --gradient) applied.

    --alpha / --lam give the step size / prior weight as such (the preset's --step / --hold, alpha
    and lam in the model's own units, no longer apply to it); --step / --hold give them in the
    model's units, resolved on the run's held-out normal images (`thresholds.load_or_resolve`).
    """
    config = dataclasses.replace(
        override(config, steps=args.steps, alpha=args.alpha, lam=args.lam, smoothing_sigma=args.sigma),
        weighting=not args.no_weighting, use_kl=not args.no_kl, backtrack=not args.no_backtrack,
        gradient=getattr(args, "gradient", None) or config.gradient)
    if args.alpha is not None:
        config = dataclasses.replace(config, step=None)
    if args.lam is not None:
        config = dataclasses.replace(config, hold=None)
    return override(config, step=args.step, hold=args.hold)


def threshold_config(args: argparse.Namespace):
    """The `ThresholdConfig` of the flags a script has: --holdout, --pixel-quantile, --image-quantile,
    --threshold, --image-threshold, --no-early-stop, --normal-dir; the defaults for those it lacks or leaves out."""
    from iepjax.config import ThresholdConfig
    return override(ThresholdConfig(), holdout=getattr(args, "holdout", None),
                    pixel_quantile=getattr(args, "pixel_quantile", None),
                    image_quantile=getattr(args, "image_quantile", None),
                    pixel_threshold=getattr(args, "threshold", None),
                    image_threshold=getattr(args, "image_threshold", None),
                    early_stop=False if getattr(args, "no_early_stop", False) else None,
                    map=map_config(args), normal_dir=getattr(args, "normal_dir", None))


def start_runtime(args: argparse.Namespace, *, train=None, projection_steps: int | None = None):
    """CPU tuning (`iepjax.cpu_runtime`) and the process group (`iepjax.distributed`), before any
    JAX computation; returns the mesh to split batches over (`sharding.make_mesh`: --devices per
    process, for `train` the most that divide its batch).

    One process: one CPU device per core (or --cpu-devices); several: one per process unless
    --cpu-devices says otherwise (the processes share the cores). For `train` (a TrainConfig), glibc's
    malloc keeps freed memory when the steps' buffers are large; for projections of
    `projection_steps` steps, advice on long projections is printed.
    """
    from iepjax import cpu_runtime, distributed
    multi_process = hasattr(args, "coordinator")
    group = (distributed.requested(args.coordinator, args.num_processes, args.process_id, args.distributed)
             if multi_process else None)
    if args.cpu_devices is not None or group is None:
        cpu_runtime.use_cpu_cores(args.cpu_devices)
    if multi_process:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
    devices = getattr(args, "devices", None)
    if train is not None:
        cpu_runtime.for_training(train, devices or cpu_runtime.cpu_devices_chosen())
    from iepjax import sharding
    mesh = sharding.make_mesh(devices, divides=train.batch_size if train is not None else None)
    advice = projection_steps and cpu_runtime.long_projection_advice(projection_steps, sharding.local_size(mesh))
    if advice:
        print(advice, file=sys.stderr)
    return mesh


def guarded(call: Callable, *args: Any, usage: tuple[type[BaseException], ...] = (), **kwargs: Any) -> tuple[int, Any]:
    """(EXIT_OK, call(*args, **kwargs)), or (exit status, None) after printing, as one line on
    stderr, an error the user can act on: bad data (`DataError`) or a `usage` error -> EXIT_ERROR;
    a FloatingPointError (a diverged or unusable model) -> EXIT_FAILED, and the run folder when
    the error names one."""
    from iepjax.data import DataError
    try:
        return EXIT_OK, call(*args, **kwargs)
    except (DataError, *usage) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR, None
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        if getattr(e, "run_dir", None) is not None:
            print(f"run folder: {e.run_dir}")
        return EXIT_FAILED, None


def report_inference(out, summary: dict) -> int:
    """Print what `pipelines.infer_folder` did (its output folder and summary.json's content);
    EXIT_PARTIAL when some image files could not be read (the others' results are written), else EXIT_OK."""
    from iepjax import report
    print(report.format_inference(summary))
    print(f"output folder: {out} (scores.csv, errors.csv, maps/*.tiff, overlays/)")
    if not summary["n_failed"]:
        return EXIT_OK
    print(f"error: {summary['n_failed']} of {summary['n_failed'] + summary['n_images']} image files could not "
          f"be read (listed in {out / 'errors.csv'}); the other {summary['n_images']} were processed", file=sys.stderr)
    return EXIT_PARTIAL
