"""Localise defects in the test images of a category with its latest trained run.

    python project.py --category brick
    python project.py --category brick --model ae_ssim        # the AE-SSIM run (train.py --model ae_ssim)
    python project.py --category brick --gradient detached    # f(x) held constant (the ports' ablation)
    python project.py --category brick --steps 50 --alpha 0.5 --lam 0.05
    python project.py --dataset mvtec_ad --category carpet     # official protocol, TIFF maps
    python project.py --data-dir my_images --category widget   # your own labelled folder
    python project.py --data-dir my_images --category widget --input-dir new_parts/   # no labels

Writes metrics.json, maps.npz, overlays/ and energy.png into <run>/projections/v<N>/ and prints
the metrics table and that folder. Output folders appear complete or not at all.

Refused before any work, with a message that says what to do (exit 2): a run of another category,
a run without a checkpoint, folders it cannot write, too few held-out normal images to fit
thresholds (pass --threshold and --image-threshold), an existing --out (--overwrite). A run whose
model collapsed to the mean image is refused with exit 3 (--allow-collapse projects it anyway); a
run whose training has not finished (no training.json: being trained now, or stopped early) is
projected with a warning, from its newest checkpoint.

--input-dir: every readable image is processed; unreadable files are named on stderr and in
errors.csv, and the exit status is then 4 (the others' results are written).
"""
import argparse
import dataclasses
import sys
from pathlib import Path

from iepjax import cli, loss_scale, presets, report, runs
from iepjax.pipelines import infer_folder, project_run
from iepjax.pipelines.infer import list_images
from iepjax.thresholds import ThresholdError, check_held_out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_data_flags(p)
    cli.add_model_flags(p)
    cli.add_ablation_flags(p)
    p.add_argument("--run", default=None, help="run folder or v<N> (default: latest)")
    p.add_argument("--steps", type=cli.nonnegative_int, help="projection steps T")
    p.add_argument("--alpha", type=cli.nonnegative_float, help="step size")
    p.add_argument("--lam", type=cli.nonnegative_float, help="weight of the L1 prior ||x - x0||_1")
    p.add_argument("--sigma", type=cli.nonnegative_float, help="Gaussian smoothing of the maps, pixels")
    p.add_argument("--hold", type=cli.fraction,
                   help="lam in the model's own units: the fraction of held-out normal pixels the L1 prior keeps "
                        "at x0 (iepjax.loss_scale; replaces --lam; written to loss_scale.json)")
    p.add_argument("--step", type=cli.positive_float,
                   help="alpha in the model's own units: a typical normal pixel's first step (replaces --alpha)")
    p.add_argument("--no-weighting", action="store_true", help="plain gradient step (the paper's ablation)")
    p.add_argument("--no-backtrack", action="store_true",
                   help="no safeguard: keep a step even when it raised the image's energy (the paper's plain loop)")
    p.add_argument("--no-kl", action="store_true", help="leave the KL term out of the energy")
    p.add_argument("--no-early-stop", action="store_true",
                   help="always take T steps (default: an image stops once its loss is as low as the lowest of the "
                        "run's held-out normal images)")
    p.add_argument("--threshold", type=cli.nonnegative_float,
                   help="pixel threshold (default: fitted on the run's held-out normal images)")
    p.add_argument("--image-threshold", type=cli.nonnegative_float,
                   help="image threshold (default: fitted); with --threshold, nothing is fitted")
    cli.add_threshold_flags(p)
    p.add_argument("--batch-size", type=cli.positive_int, default=16)
    p.add_argument("--input-dir", default=None,
                   help="plain folder of images (no masks, no labels): write maps/*.tiff, overlays/*.png and "
                        "scores.csv for every image with the category's trained run")
    p.add_argument("--out", default=None, help="--input-dir: output folder (default <run>/inference/v<N>)")
    p.add_argument("--overwrite", action="store_true",
                   help="--input-dir --out: replace an existing output folder (once the new one is complete)")
    p.add_argument("--allow-collapse", "--allow-collapsed", dest="allow_collapse", action="store_true",
                   help="project a run whose model collapsed to the mean image (refused by default)")
    cli.add_output_flags(p)
    cli.add_runtime_flags(p)
    a = p.parse_args(argv)
    try:
        source = cli.data_config(a)
    except ValueError as e:
        p.error(str(e))
    thresholds = cli.threshold_config(a)
    try:
        presets.check(source.dataset, source.category)  # an unknown category is named before a missing run
        run_dir = runs.find_run(a.results, a.model, source.dataset, source.category, a.run)
        runs.check_outputs_writable(run_dir, a.out if a.input_dir else None, inference=a.input_dir is not None)
        if a.input_dir is not None:
            list_images(a.input_dir)  # the folder exists
            if a.out and not a.overwrite and Path(a.out).exists() and (not Path(a.out).is_dir()
                                                                        or any(Path(a.out).iterdir())):
                raise FileExistsError(f"output folder {a.out} exists and is not empty: choose another --out, "
                                      "or add --overwrite to replace it")
        warnings = runs.check_trained(run_dir, source.category, allow_collapse=a.allow_collapse)
        check_held_out(run_dir, thresholds)
        # alpha and lam follow the run's likelihood (a --likelihood bce run gets the BCE values)
        config = presets.projection_config(source.dataset, source.category, runs.model_config(run_dir).get("likelihood"))
    except runs.CollapsedRun as e:
        print(f"error: {e}", file=sys.stderr)
        return cli.EXIT_COLLAPSED
    except (ValueError, OSError) as e:  # OSError: FileNotFoundError, FileExistsError, PermissionError
        print(f"error: {e}", file=sys.stderr)
        return cli.EXIT_ERROR
    for w in warnings:
        print(w, file=sys.stderr)
    config = dataclasses.replace(cli.override(config, steps=a.steps, alpha=a.alpha, lam=a.lam, smoothing_sigma=a.sigma),
                                 weighting=not a.no_weighting, use_kl=not a.no_kl, backtrack=not a.no_backtrack,
                                 gradient=a.gradient or config.gradient)
    relative = None
    if a.hold is not None or a.step is not None:
        if a.input_dir is not None:
            p.error("--hold / --step resolve alpha and lam for a run's test split; with --input-dir give --alpha / --lam")
        relative = cli.override(loss_scale.RelativeSettings(), hold=a.hold, step=a.step)
    mesh = cli.start_runtime(a, projection_steps=config.steps)
    run = dict(batch_size=a.batch_size, overlays=not a.no_overlays, progress=not a.no_progress)
    usage = (ThresholdError, FileNotFoundError, FileExistsError)
    if a.input_dir is not None:  # plain-folder inference, on one device per process
        status, done = cli.guarded(infer_folder, run_dir, a.input_dir, source, config, thresholds, out=a.out,
                                   overwrite=a.overwrite, usage=usage, **run)
        if done is None:
            return status
        out, summary = done
        print(report.format_inference(summary))
        print(f"output folder: {out} (scores.csv, errors.csv, maps/*.tiff, overlays/)")
        if summary["n_failed"]:
            print(f"error: {summary['n_failed']} of {summary['n_failed'] + summary['n_images']} image files could not "
                  f"be read (listed in {out / 'errors.csv'}); the other {summary['n_images']} were processed",
                  file=sys.stderr)
            return cli.EXIT_PARTIAL
        return status
    status, out = cli.guarded(project_run, run_dir, source, config, thresholds, mesh=mesh, usage=usage,
                              relative=relative, **run)
    out_dir, result = out or (None, None)
    if out_dir is not None:  # process 0 reports
        print(report.format_projection(result))
        print(f"output folder: {out_dir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
