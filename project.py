"""Localise defects in the test images of a category with its latest trained run.

    python project.py --category brick
    python project.py --category brick --steps 50 --alpha 0.5 --lam 0.05
    python project.py --dataset mvtec_ad --category carpet     # official protocol, TIFF maps
    python project.py --data-dir my_images --category widget   # your own labelled folder
    python project.py --data-dir my_images --category widget --input-dir new_parts/   # no labels

Writes metrics.json, maps.npz, overlays/ and energy.png into <run>/projections/v<N>/ and prints
the metrics table and that folder.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

from iepjax import cli, loss_scale, presets, report, runs
from iepjax.pipelines import infer_folder, project_run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_data_flags(p)
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
    p.add_argument("--threshold", type=float, help="pixel threshold (default: stored, from held-out normal images)")
    p.add_argument("--image-threshold", type=float, help="image threshold (default: stored)")
    cli.add_threshold_flags(p)
    p.add_argument("--batch-size", type=cli.positive_int, default=16)
    p.add_argument("--input-dir", default=None,
                   help="plain folder of images (no masks, no labels): write maps/*.tiff, overlays/*.png and "
                        "scores.csv for every image with the category's trained run")
    p.add_argument("--out", default=None, help="--input-dir: output folder (default <run>/inference/v<N>)")
    cli.add_output_flags(p)
    cli.add_runtime_flags(p)
    a = p.parse_args(argv)
    try:
        source = cli.data_config(a)
    except ValueError as e:
        p.error(str(e))
    try:
        presets.check(source.dataset, source.category)  # an unknown category is named before a missing run
        run_dir = runs.find_run(a.results, "vae", source.dataset, source.category, a.run)
        runs.check_outputs_writable(run_dir, a.out if a.input_dir else None, inference=a.input_dir is not None)
        # alpha and lam follow the run's likelihood (a --likelihood bce run gets the BCE values)
        config = presets.projection_config(source.dataset, source.category, runs.model_config(run_dir).get("likelihood"))
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return cli.EXIT_ERROR
    config = dataclasses.replace(cli.override(config, steps=a.steps, alpha=a.alpha, lam=a.lam, smoothing_sigma=a.sigma),
                                 weighting=not a.no_weighting, use_kl=not a.no_kl, backtrack=not a.no_backtrack)
    relative = None
    if a.hold is not None or a.step is not None:
        if a.input_dir is not None:
            p.error("--hold / --step resolve alpha and lam for a run's test split; with --input-dir give --alpha / --lam")
        relative = cli.override(loss_scale.RelativeSettings(), hold=a.hold, step=a.step)
    mesh = cli.start_runtime(a, projection_steps=config.steps)
    run = dict(batch_size=a.batch_size, overlays=not a.no_overlays, progress=not a.no_progress)
    if a.input_dir is not None:  # plain-folder inference, on one device per process
        out = Path(a.out) if a.out else runs.new_run(Path(run_dir) / "inference")
        status, summary = cli.guarded(infer_folder, run_dir, a.input_dir, out, source, config, cli.threshold_config(a),
                                      usage=(FileNotFoundError,), **run)
        if summary is not None:
            print(report.format_inference(summary))
            print(f"output folder: {out} (scores.csv, maps/*.tiff, overlays/)")
        return status
    status, out = cli.guarded(project_run, run_dir, source, config, cli.threshold_config(a), mesh=mesh,
                              relative=relative, **run)
    out_dir, result = out or (None, None)
    if out_dir is not None:  # process 0 reports
        print(report.format_projection(result))
        print(f"output folder: {out_dir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
