"""Train the method's VAE (or the paper's AE baselines) on the normal images of one category.

    python train.py --category brick            # built-in textures data, the VAE
    python train.py --category brick --model ae_ssim   # the AE with the SSIM loss (or ae_l2)
    python train.py --category brick --steps 50 --batch-size 8   # a quick try
    python train.py --dataset mvtec_ad --category carpet --manual-dir ~/mvtec_anomaly_detection
    python train.py --data-dir my_images --category widget     # my_images/widget/train/good/*.png

Prints the run folder (results/<model>/<dataset>/<category>/v<N>/); rerunning resumes it. The
thresholds project.py uses by default are fitted on held-out normal images and stored there.
"""
import argparse
import sys

from iepjax import cli, presets, report
from iepjax.atomic import check_writable
from iepjax.config import DECODERS, LIKELIHOODS
from iepjax.data.preprocess import MAX_TILES
from iepjax.pipelines import train_category


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_data_flags(p)
    cli.add_model_flags(p)
    p.add_argument("--steps", type=cli.positive_int, help="optimiser steps (default: the category preset)")
    p.add_argument("--batch-size", type=cli.positive_int, help="images per step")
    p.add_argument("--lr", type=cli.positive_float, help="Adam learning rate (paper: 2e-4)")
    p.add_argument("--size", "--image-size", dest="size", type=cli.model_size,
                   help="model input size, a multiple of 16 (default: the category preset, 64 for the built-in "
                        "textures, 128 for MVTec AD as in the paper; 256 also works)")
    p.add_argument("--kind", choices=("texture", "object"),
                   help="texture: random crops at a working scale, tiled at test; object: resized (default: preset)")
    p.add_argument("--tile-stride", type=cli.positive_int,
                   help="textures: stride of the test tiles in pixels at the model size; overlaps are blended "
                        "(default: the preset, half a tile for the built-in textures; MVTec AD and own folders: half a "
                        f"tile where an image then takes at most {MAX_TILES} tiles; --size for no overlap). Rerun on a "
                        "trained run, it changes only the run's test tiling (thresholds are fitted again)")
    p.add_argument("--texture-fov", type=cli.unit_fraction,
                   help="textures: working scale, the fraction of the working image's short side one model input "
                        "covers (default: the preset; 0.25 for MVTec AD). Own folders never upsample their images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--likelihood", choices=LIKELIHOODS, help="reconstruction term: bce or gaussian (learned gamma)")
    p.add_argument("--decoder", choices=DECODERS, help="upsample+conv or transposed convs")
    p.add_argument("--free-bits", type=cli.nonnegative_float,
                   help="floor in nats on each latent dimension's KL (free bits; 0 = plain KL; default: the preset)")
    p.add_argument("--kl-warmup", type=cli.nonnegative_int,
                   help="steps over which the KL weight rises from 0 to 1 (0 = none; default: the preset)")
    p.add_argument("--holdout", type=cli.fraction, help="fraction of normal training images kept for thresholds (0.1)")
    p.add_argument("--new", action="store_true", help="start a new run folder instead of resuming the latest")
    cli.add_threshold_flags(p)
    p.add_argument("--proj-steps", type=cli.nonnegative_int,
                   help="projection steps the run's thresholds are fitted for (default: the category preset's); "
                        "project.py --steps N with the same N reads them back, other settings fit their own")
    p.add_argument("--allow-collapse", action="store_true",
                   help="keep a model that collapsed to the mean image as it is (no retraining) and exit 0")
    p.add_argument("--no-collapse-retry", action="store_true",
                   help="when the VAE collapses, stop (exit 3) instead of training it again with --free-bits 0.5")
    cli.add_output_flags(p, overlays=False)
    cli.add_runtime_flags(p)
    a = p.parse_args(argv)
    try:
        source = cli.data_config(a)
        if a.model != "vae" and (a.likelihood or a.free_bits or a.kl_warmup):
            raise ValueError(f"--model {a.model} is a deterministic AE with its own loss: --likelihood, --free-bits and "
                             "--kl-warmup are the VAE's")
        config = presets.train_config(source.dataset, source.category, size=a.size, kind=a.kind, model=a.model)
        config = cli.override(config, model=cli.override(config.model, likelihood=a.likelihood, decoder=a.decoder),
                              steps=a.steps, batch_size=a.batch_size, learning_rate=a.lr, seed=a.seed,
                              free_bits=a.free_bits, kl_warmup=a.kl_warmup)
        prep = presets.preprocess(source.dataset, source.category, size=a.size, kind=a.kind, tile_stride=a.tile_stride,
                                  texture_fov=a.texture_fov)
        check_writable(a.results, what="--results folder")  # before any data is prepared or a step trained
    except (ValueError, PermissionError) as e:
        p.error(str(e))
    note = presets.kind_note(source.dataset, source.category, a.kind)
    if note:
        print(note, file=sys.stderr)
    mesh = cli.start_runtime(a, train=config)
    status, out = cli.guarded(train_category, config, prep, cli.threshold_config(a), source, results=a.results,
                              new=a.new, progress=not a.no_progress, mesh=mesh, calibrate_collapsed=a.allow_collapse,
                              retry_collapsed=not a.no_collapse_retry, projection_steps=a.proj_steps)
    if out is None:
        return status
    if out.retried_from is not None:
        print(f"collapsed run: {out.retried_from} (trained again here with --free-bits {out.summary.config.free_bits})")
    print(report.format_collapse(out.summary.collapse))
    if out.summary.collapse.collapsed:
        used = out.summary.config
        print("ERROR: the model collapsed to predicting the mean image (reconstruction loss near the constant "
              "predictor's, ratio >= 0.97)" + (f" with free bits {used.free_bits}" if used.free_bits else "") + ". "
              + ("Try --likelihood gaussian, " if used.model.likelihood == "bce" else "Try ")
              + (("" if used.free_bits else "--free-bits 0.5 (a floor on each latent dimension's KL), ")
                 + "--kl-warmup 1000, " if a.model == "vae" else "")
              + "more --steps, another --lr or --seed; see docs/calibration.md.", file=sys.stderr)
        if not a.allow_collapse:
            print(f"run folder: {out.run_dir}")
            return cli.EXIT_COLLAPSED
    if out.thresholds is not None:
        print(report.format_thresholds(out.thresholds))
    print(f"run folder: {out.run_dir}")
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
