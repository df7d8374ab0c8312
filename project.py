"""Localise defects in the test images of a category with its latest trained run.

    python project.py --category brick
    python project.py --category brick --steps 50 --alpha 0.5 --lam 0.05

Writes metrics.json, maps.npz, overlays/ and energy.png into <run>/projections/p<N>/ and prints
the metrics table and that folder.
"""
import argparse
import sys

from iepjax.config import ProjectionConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="textures")
    p.add_argument("--category", required=True)
    p.add_argument("--tfds-dir", default=None, help="where TFDS keeps prepared data (default $IEPJAX_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--results", default="results")
    p.add_argument("--run", default=None, help="run folder or v<N> (default: latest)")
    p.add_argument("--steps", type=int, help="projection steps T")
    p.add_argument("--alpha", type=float, help="step size")
    p.add_argument("--lam", type=float, help="weight of the L1 prior ||x - x0||_1")
    p.add_argument("--sigma", type=float, help="Gaussian smoothing of the maps, pixels")
    p.add_argument("--no-weighting", action="store_true", help="plain gradient step (the paper's ablation)")
    p.add_argument("--no-kl", action="store_true", help="leave the KL term out of the energy")
    p.add_argument("--threshold", type=float, help="pixel threshold (default: stored, from held-out normal images)")
    p.add_argument("--image-threshold", type=float, help="image threshold (default: stored)")
    p.add_argument("--pixel-quantile", type=float, default=0.995, help="quantile of normal pixel scores used as threshold")
    p.add_argument("--image-quantile", type=float, default=0.99, help="quantile of normal image scores used as threshold")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-overlays", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    from iepjax import evaluation, runs
    from iepjax.presets import preset
    try:
        pre = preset(a.dataset, a.category)
        run_dir = runs.find_run(a.results, "vae", a.dataset, a.category, a.run)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = ProjectionConfig(steps=pre["proj_steps"] if a.steps is None else a.steps,
                              alpha=pre["alpha"] if a.alpha is None else a.alpha,
                              lam=pre["lam"] if a.lam is None else a.lam,
                              smoothing_sigma=pre["smoothing_sigma"] if a.sigma is None else a.sigma,
                              weighting=not a.no_weighting, use_kl=not a.no_kl)
    out_dir, result = evaluation.project_run(run_dir, a.dataset, a.category, config, data_dir=a.tfds_dir,
                                             batch_size=a.batch_size, overlays=not a.no_overlays,
                                             progress=not a.no_progress, pixel_threshold=a.threshold,
                                             image_threshold=a.image_threshold, pixel_quantile=a.pixel_quantile,
                                             image_quantile=a.image_quantile)
    print(evaluation.format_table(result))
    th, t = result["thresholds"], result["timing"]
    print(f"thresholds ({th['source']}): pixel {result['grad']['pixel_threshold']:.4g}, "
          f"image {result['grad']['image_threshold']:.4g}")
    print(f"compile {t['compile_s']:.1f} s, total {t['total_s']:.1f} s, steady state {t['steady_img_per_s']} img/s")
    print(f"output folder: {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
