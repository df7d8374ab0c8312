"""Export a trained run as a self-contained folder that predict.py / iepjax.Predictor run without the training code.

    python export.py --category brick --out exported/brick
    python export.py --category brick --run results/vae/textures/brick/v0 --out exported/brick
    python export.py --data-dir my_images --category widget --out exported/widget
    python export.py --category brick --model ae_l2 --out exported/brick_ae_l2

The folder holds the projection and the reconstruction-error map as jax.export programs (symbolic
batch, lowered for CPU, CUDA and TPU where this jax can), the parameters, metadata.json
(preprocessing, thresholds, normalisation, metrics, versions, checksums) and MODEL_CARD.md.
Thresholds and settings come from the run's latest projection (project.py) if it has one, else
from the run's thresholds.json, else they are fitted on the run's held-out normal images first.
With --normal-dir DIR the thresholds are fitted again on DIR's normal images (good parts imaged as
production images are), with the same settings, quantiles and image score:

    python export.py --category brick --normal-dir good_parts --out exported/brick
"""
import argparse
import sys

from iepjax import cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="textures")
    p.add_argument("--category", help="category of the run (required unless --run is a run folder)")
    p.add_argument("--data-dir", default=None, help="your own images in the MVTec AD layout (sets --dataset folder)")
    p.add_argument("--tfds-dir", default=None, help="where TFDS keeps prepared data (used only to fit missing thresholds)")
    p.add_argument("--results", default="results")
    p.add_argument("--run", default=None, help="run folder or v<N> (default: latest)")
    cli.add_model_flags(p)
    p.add_argument("--allow-collapse", action="store_true",
                   help="export a run whose model collapsed to the mean image (refused by default)")
    p.add_argument("--projection", default="latest",
                   help="projection folder name under <run>/projections whose settings, thresholds and metrics to ship "
                        "(default latest; 'none': the run's own thresholds.json)")
    p.add_argument("--normal-dir", default=None,
                   help="a folder of normal images taken as the production images are: fit the shipped thresholds "
                        "on them (as project.py --normal-dir) instead of taking the run's")
    p.add_argument("--platforms", default="cpu,cuda,tpu", help="comma-separated platforms to lower for")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.category is None and a.run is None:
        p.error("give --category (or --run with a run folder)")
    platforms = tuple(s.strip() for s in a.platforms.split(",") if s.strip())
    from iepjax import cpu_runtime
    cpu_runtime.use_cpu_cores()  # as train.py: a checkpoint restores onto the device count it was saved from
    from iepjax.data import DataError
    from iepjax.export import export_run
    from iepjax.runs import CollapsedRun
    from iepjax.predictor import METADATA_FILE
    try:
        out = export_run(a.out, category=a.category, dataset=a.dataset, results=a.results, run=a.run,
                         data_dir=a.data_dir, tfds_dir=a.tfds_dir,
                         projection=None if a.projection == "none" else a.projection,
                         platforms=platforms, progress=not a.no_progress, model=a.model,
                         allow_collapse=a.allow_collapse, normal_dir=a.normal_dir)
    except CollapsedRun as e:
        print(f"error: {e}", file=sys.stderr)
        return cli.EXIT_COLLAPSED
    except (ValueError, FileNotFoundError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import json
    meta = json.loads((out / METADATA_FILE).read_text())
    th = meta["thresholds"]
    print(f"exported {meta['source']['run_dir']} for {', '.join(meta['platforms'])}"
          + (f" (not lowered: {', '.join(meta['not_lowered'])})" if meta["not_lowered"] else ""))
    print(f"thresholds ({th['source']}, {th['n_images']} images): pixel {th['pixel_threshold']:.4g}, "
          f"image {th['image_threshold']:.4g}")
    print(f"export folder: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
