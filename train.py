"""Train the method's VAE on the normal images of one category.

    python train.py --category brick            # built-in textures data, 128x128
    python train.py --category brick --steps 50 --batch-size 8   # a quick try
    python train.py --dataset mvtec_ad --category carpet --manual-dir ~/mvtec_anomaly_detection
    python train.py --data-dir my_images --category widget     # my_images/widget/train/good/*.png

Prints the run folder (results/vae/<dataset>/<category>/v<N>/); rerunning resumes it.
"""
import argparse
import sys

from iepjax.config import ModelConfig, TrainConfig, LIKELIHOODS, DECODERS
from iepjax.cli import fraction, model_size, positive_float, positive_int, quantile
from iepjax.presets import preset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="textures", help="dataset name (built-in: textures)")
    p.add_argument("--category", required=True, help="category, e.g. brick or grass")
    p.add_argument("--tfds-dir", default=None, help="where TFDS keeps prepared data (default $IEPJAX_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--results", default="results", help="root of the run folders")
    p.add_argument("--steps", type=positive_int, help="optimiser steps (default: the category preset)")
    p.add_argument("--batch-size", type=positive_int, help="images per step")
    p.add_argument("--lr", type=positive_float, help="Adam learning rate (paper: 2e-4)")
    p.add_argument("--size", "--image-size", dest="size", type=model_size,
                   help="model input size, a multiple of 16 (default: the category preset, 64 for the built-in "
                        "textures, 128 for MVTec AD as in the paper; 256 also works)")
    # --- issue 3: MVTec AD and own image folders (docs/datasets.md) ---
    p.add_argument("--data-dir", default=None,
                   help="your own images in the MVTec AD layout: DIR/<category>/train/good/*, DIR/<category>/test/<kind>/*, "
                        "DIR/<category>/ground_truth/<kind>/*_mask.png (sets --dataset folder)")
    p.add_argument("--manual-dir", default=None,
                   help="--dataset mvtec_ad: the MVTec AD download (extracted folder or mvtec_anomaly_detection.tar.xz); "
                        "needed the first time a category is prepared")
    p.add_argument("--kind", choices=("texture", "object"),
                   help="texture: random crops at a working scale, tiled at test; object: resized (default: preset)")
    p.add_argument("--tile-stride", type=positive_int,
                   help="textures: stride of the test tiles in pixels at the model size; overlaps are blended "
                        "(default: the preset, half a tile for the built-in textures; --size for no overlap). Rerun on a "
                        "trained run, it changes only the run's test tiling (thresholds are fitted again)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--likelihood", choices=LIKELIHOODS, help="reconstruction term: bce or gaussian (learned gamma)")
    p.add_argument("--decoder", choices=DECODERS, help="upsample+conv or transposed convs")
    p.add_argument("--holdout", type=fraction, default=0.1, help="fraction of normal training images kept for thresholds")
    p.add_argument("--new", action="store_true", help="start a new run folder instead of resuming the latest")
    p.add_argument("--pixel-quantile", type=quantile, default=0.995, help="quantile of normal pixel scores -> threshold")
    p.add_argument("--image-quantile", type=quantile, default=0.99, help="quantile of normal image scores -> threshold")
    p.add_argument("--allow-collapse", action="store_true", help="exit 0 even if the model collapsed to the mean")
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

    from iepjax import data, sharding, training
    from iepjax.data.preprocess import from_preset
    try:
        pre = preset(a.dataset, a.category)
        if a.kind is not None:
            pre["augment"] = a.kind == "texture"
        prep = from_preset(a.dataset, a.category, size=a.size, kind=a.kind, tile_stride=a.tile_stride)
        model = ModelConfig(size=a.size or pre["size"], channels=pre["channels"],
                            likelihood=a.likelihood or pre["likelihood"], decoder=a.decoder or pre["decoder"])
        config = TrainConfig(model=model, steps=a.steps or pre["train_steps"],
                             batch_size=a.batch_size or pre["batch_size"], learning_rate=a.lr or pre["learning_rate"],
                             seed=a.seed, augment=pre.get("augment", True))
        from iepjax.atomic import check_writable
        check_writable(a.results, what="--results folder")  # before any data is prepared or a step trained
    except (ValueError, PermissionError) as e:
        p.error(str(e))
    from iepjax import hostmem  # large training steps on CPU: freed host memory kept for reuse (before any JAX work)
    hostmem.for_training(config, a.devices or distributed.cpu_devices_chosen())
    # the batch split over the devices (one per CPU core by default, see --cpu-devices); None on one device
    mesh = sharding.make_mesh(a.devices, divides=config.batch_size)
    try:
        run_dir, summary = training.train_run(config, a.dataset, a.category, results=a.results, data_dir=a.tfds_dir,
                                              holdout=a.holdout, new=a.new, progress=not a.no_progress,
                                              source_dir=source_dir, prep=prep, mesh=mesh)
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # training diverged: the message says what to change
        print(f"error: {e}", file=sys.stderr)
        return 1
    c = summary.collapse
    print(f"reconstruction loss per pixel {c.recon_per_pixel:.4f} (constant predictor {c.constant_per_pixel:.4f}, "
          f"ratio {c.ratio:.3f}), KL per image {c.kl_per_image:.2f}")
    if c.collapsed:
        print("ERROR: the model collapsed to predicting the mean image (reconstruction loss near the constant "
              "predictor's, ratio >= 0.97). "
              + ("Try --likelihood gaussian, " if summary.config.model.likelihood == "bce" else "Try ")
              + "more --steps, another --lr or --seed; see README 'How the defaults were chosen'.", file=sys.stderr)
        if not a.allow_collapse:
            print(f"run folder: {run_dir}")
            return 3
    if a.holdout > 0:  # thresholds from held-out normal images, stored with the model
        from iepjax import evaluation
        from iepjax.data.preprocess import Preprocess
        normal = evaluation.held_out_images(run_dir, a.dataset, a.category, a.tfds_dir)
        try:
            pcfg = evaluation.with_early_stop(  # the settings project.py uses by default, early stopping included
                summary.state.params, evaluation.default_projection_config(a.dataset, a.category, summary.config.model),
                normal, Preprocess.load(run_dir))
        except FloatingPointError as e:
            print(f"error: {e}", file=sys.stderr)
            print(f"run folder: {run_dir}")
            return 1
        th, _ = evaluation.load_or_calibrate(
            run_dir, summary.state.params, pcfg, normal,
            progress=not a.no_progress, pixel_quantile=a.pixel_quantile, image_quantile=a.image_quantile, mesh=mesh)
        print(f"thresholds from {th['grad'].n_images} held-out normal images: pixel {th['grad'].pixel_threshold:.4g} "
              f"(q {a.pixel_quantile}), image {th['grad'].image_threshold:.4g} (q {a.image_quantile})")
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
