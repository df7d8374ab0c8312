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
import sys

from iepjax.cli import nonnegative_float, nonnegative_int, positive_int, quantile
from iepjax.config import ProjectionConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="textures")
    p.add_argument("--category", required=True)
    p.add_argument("--tfds-dir", default=None, help="where TFDS keeps prepared data (default $IEPJAX_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--results", default="results")
    p.add_argument("--run", default=None, help="run folder or v<N> (default: latest)")
    p.add_argument("--steps", type=nonnegative_int, help="projection steps T")
    p.add_argument("--alpha", type=nonnegative_float, help="step size")
    p.add_argument("--lam", type=nonnegative_float, help="weight of the L1 prior ||x - x0||_1")
    p.add_argument("--sigma", type=nonnegative_float, help="Gaussian smoothing of the maps, pixels")
    p.add_argument("--no-weighting", action="store_true", help="plain gradient step (the paper's ablation)")
    p.add_argument("--no-backtrack", action="store_true",
                   help="no safeguard: keep a step even when it raised the image's energy (the paper's plain loop)")
    p.add_argument("--no-kl", action="store_true", help="leave the KL term out of the energy")
    p.add_argument("--no-early-stop", action="store_true",
                   help="always take T steps (default: an image stops once its loss is as low as the lowest of the "
                        "run's held-out normal images)")
    p.add_argument("--threshold", type=float, help="pixel threshold (default: stored, from held-out normal images)")
    p.add_argument("--image-threshold", type=float, help="image threshold (default: stored)")
    p.add_argument("--pixel-quantile", type=quantile, default=0.995, help="quantile of normal pixel scores used as threshold")
    p.add_argument("--image-quantile", type=quantile, default=0.99, help="quantile of normal image scores used as threshold")
    p.add_argument("--batch-size", type=positive_int, default=16)
    # --- issue 3: MVTec AD, own image folders, plain-folder inference (docs/datasets.md) ---
    p.add_argument("--data-dir", default=None,
                   help="your own images in the MVTec AD layout (DIR/<category>/...; sets --dataset folder)")
    p.add_argument("--manual-dir", default=None, help="--dataset mvtec_ad: the MVTec AD download, if not prepared yet")
    p.add_argument("--input-dir", default=None,
                   help="plain folder of images (no masks, no labels): write maps/*.tiff, overlays/*.png and "
                        "scores.csv for every image with the category's trained run")
    p.add_argument("--out", default=None, help="--input-dir: output folder (default <run>/inference/v<N>)")
    p.add_argument("--no-overlays", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    from iepjax import distributed  # issue 6: --devices and multi-process flags (docs/scaling.md)
    distributed.add_flags(p)
    a = p.parse_args(argv)
    distributed.initialize_from_args(a)
    from iepjax.data import dataset_and_source
    try:
        a.dataset, source_dir = dataset_and_source(a.dataset, a.data_dir, a.manual_dir)
    except ValueError as e:
        p.error(str(e))

    from iepjax import evaluation, runs, sharding
    from iepjax.data import DataError
    mesh = sharding.make_mesh(a.devices)  # issue 6: None on one device (the single-device path)
    from iepjax.presets import preset, projection_preset
    try:
        preset(a.dataset, a.category)  # an unknown category is named before a missing run
        run_dir = runs.find_run(a.results, "vae", a.dataset, a.category, a.run)
        runs.check_outputs_writable(run_dir, a.out if a.input_dir else None, inference=a.input_dir is not None)
        # alpha and lam follow the run's likelihood (a --likelihood bce run gets the BCE values)
        pre = projection_preset(a.dataset, a.category, runs.model_config(run_dir).get("likelihood"))
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = ProjectionConfig(steps=pre["proj_steps"] if a.steps is None else a.steps,
                              alpha=pre["alpha"] if a.alpha is None else a.alpha,
                              lam=pre["lam"] if a.lam is None else a.lam,
                              smoothing_sigma=pre["smoothing_sigma"] if a.sigma is None else a.sigma,
                              weighting=not a.no_weighting, use_kl=not a.no_kl, backtrack=not a.no_backtrack)
    if a.input_dir is not None:  # issue 3: plain-folder inference
        from pathlib import Path

        from iepjax import protocol
        out = Path(a.out) if a.out else runs.new_run(Path(run_dir) / "inference")
        try:
            summary = protocol.infer_folder(run_dir, a.input_dir, out, config, dataset=a.dataset, category=a.category,
                                            data_dir=a.tfds_dir, batch_size=a.batch_size, overlays=not a.no_overlays,
                                            progress=not a.no_progress, pixel_threshold=a.threshold,
                                            image_threshold=a.image_threshold, pixel_quantile=a.pixel_quantile,
                                            image_quantile=a.image_quantile, early_stop=not a.no_early_stop)
        except (DataError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except FloatingPointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{summary['n_images']} images, {summary['n_flagged']} above the image threshold "
              f"{summary['image_threshold']:.4g} ({summary['thresholds_from']})")
        print(f"output folder: {out} (scores.csv, maps/*.tiff, overlays/)")
        return 0
    try:
        out_dir, result = evaluation.project_run(run_dir, a.dataset, a.category, config, data_dir=a.tfds_dir,
                                                 batch_size=a.batch_size, overlays=not a.no_overlays,
                                                 progress=not a.no_progress, pixel_threshold=a.threshold,
                                                 image_threshold=a.image_threshold, pixel_quantile=a.pixel_quantile,
                                                 image_quantile=a.image_quantile, source_dir=source_dir,
                                                 mesh=mesh, early_stop=not a.no_early_stop)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # the run's model gives non-finite losses (it diverged)
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not distributed.is_main():  # issue 6: process 0 reports
        return 0
    print(evaluation.format_table(result))
    th, t = result["thresholds"], result["timing"]
    print(f"thresholds ({th['source']}): pixel {result['grad']['pixel_threshold']:.4g}, "
          f"image {result['grad']['image_threshold']:.4g}")
    where = f" (during threshold calibration)" if t.get("compiled_in") else ""
    print(f"compile {t['compile_s']:.1f} s{where}, total {t['total_s']:.1f} s, steady state {t['steady_img_per_s']} img/s")
    if "protocol" in result:  # issue 3
        print(f"metrics on maps at the original image sizes; TIFF maps: {result['protocol']['tiff_maps']['grad']}")
    print(f"output folder: {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
