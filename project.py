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
import sys

from iepjax import cli, report, runs
from iepjax.pipelines import infer_folder, project_run
from iepjax.pipelines.project import open_run
from iepjax.thresholds import ThresholdError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_data_flags(p)
    cli.add_model_flags(p)
    cli.add_ablation_flags(p)
    p.add_argument("--run", default=None, help="run folder or v<N> (default: latest)")
    cli.add_projection_flags(p)
    cli.add_threshold_flags(p)
    p.add_argument("--normal-dir", default=None,
                   help="fit the thresholds on the normal images in this folder (good parts imaged as the test "
                        "images are) instead of the run's held-out training images; unreadable files are named "
                        "and skipped")
    cli.add_map_flags(p)
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
        run_dir, config, warnings = open_run(a.results, a.model, source, a.run, thresholds, allow_collapse=a.allow_collapse,
                                             input_dir=a.input_dir, out=a.out, overwrite=a.overwrite)
    except runs.CollapsedRun as e:
        print(f"error: {e}", file=sys.stderr)
        return cli.EXIT_COLLAPSED
    except (ValueError, OSError) as e:  # OSError: FileNotFoundError, FileExistsError, PermissionError
        print(f"error: {e}", file=sys.stderr)
        return cli.EXIT_ERROR
    for w in warnings:
        print(w, file=sys.stderr)
    config = cli.projection_settings(a, config)
    mesh = cli.start_runtime(a, projection_steps=config.steps)
    run = dict(batch_size=a.batch_size, overlays=not a.no_overlays, progress=not a.no_progress)
    usage = (ThresholdError, FileNotFoundError, FileExistsError)
    if a.input_dir is not None:  # plain-folder inference, on one device per process
        status, done = cli.guarded(infer_folder, run_dir, a.input_dir, source, config, thresholds, out=a.out,
                                   overwrite=a.overwrite, usage=usage, **run)
        return status if done is None else cli.report_inference(*done)
    status, out = cli.guarded(project_run, run_dir, source, config, thresholds, mesh=mesh, usage=usage, **run)
    if out is not None and out[0] is not None:  # process 0 reports
        print(report.format_projection(out[1]))
        print(f"output folder: {out[0]}")
    return status


if __name__ == "__main__":
    sys.exit(main())
