"""The model's loss L_r on three sets of normal images of one run (docs/calibration.md, Early stopping).

    python tools/normal_losses.py --run results/vae/textures/brick/latest --category brick

Prints one line per set, with the quantiles of L_r(x) (the energy at x0 = x, paper eq. 3, per model
input: a tile or a resized image): the run's held-out normal training images (what early stopping's
bar and the thresholds are taken from), as many other training images, and the normal test images
("good") of the split `--data-seed` draws (0: the default split; use a calibration split). When
the held-out images' losses sit below the normal test images', they are easier for the model than
the images it is used on: a test image then stops moving (early stopping's bar is their smallest
loss) only once the projection has taken its loss below the easiest held-out image's.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run folder (results/<model>/<dataset>/<category>/v<N> or latest)")
    p.add_argument("--category", required=True)
    p.add_argument("--dataset", default="textures")
    p.add_argument("--tfds-dir", default=None)
    p.add_argument("--data-seed", type=int, default=1, help="the test split's seed (default 1: a calibration split)")
    a = p.parse_args(argv)

    from iepjax import data, presets, thresholds, training
    from iepjax.data.preprocess import Preprocess
    from iepjax.early_stop import model_losses

    run = Path(a.run).resolve()
    if not (run / "config.json").exists():
        print(f"error: {run} is not a run folder (no config.json)", file=sys.stderr)
        return 2
    held_ids = set(thresholds.held_out_ids(run))
    if not held_ids:
        print(f"error: {run} holds out no normal training image (holdout.json): nothing to compare", file=sys.stderr)
        return 2
    params, train_cfg = training.load_params(run)
    config = dataclasses.replace(presets.projection_config(a.dataset, a.category, size=train_cfg.model.size),
                                 model=train_cfg.model)
    # runs without preprocess.json took their images resized to the model size (as export.read_run)
    prep = Preprocess.load(run) or Preprocess(kind="object", size=train_cfg.model.size)
    source = thresholds.run_source(run, None)
    train = data.load_split(a.dataset, a.category, "train", a.tfds_dir, source_dir=source, progress=False)
    held = [im for i, im in zip(train.ids, train.images) if i in held_ids]
    others = [im for i, im in zip(train.ids, train.images) if i not in held_ids][:len(held)]
    overrides = {"seed": a.data_seed} if a.data_seed else {}
    test = data.load_split(a.dataset, a.category, "test", a.tfds_dir, source_dir=source, progress=False, **overrides)
    good = [im for im, label in zip(test.images, test.labels) if label == 0]
    for name, images in (("held-out normal training images", held), ("other training images", others),
                         (f"normal test images (data seed {a.data_seed})", good)):
        losses, _ = model_losses(params, config, images, prep)
        q = np.percentile(losses, [0, 10, 50, 90])
        print(f"{name}: {len(images)} images, {len(losses)} model inputs; L_r min {q[0]:.1f}, "
              f"p10 {q[1]:.1f}, median {q[2]:.1f}, p90 {q[3]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
