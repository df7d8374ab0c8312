"""Train a VAE on whole built-in texture crops resized to --size, print the loss and the collapse check.

    python tools/train_probe.py --category brick --size 64 --likelihood bce --steps 1000 --batch 32
    python tools/train_probe.py --category brick --size 64 --likelihood gaussian --steps 800 --no-kl

The probe behind docs/calibration.md: likelihood (BCE vs Gaussian), plain AE (--no-kl), learning
rate and batch size, without run folders, thresholds or the preset's patches. Prints the loss
every 50 steps and, at the end, `training.CollapseReport` on the first 64 crops (ratio = the
model's per-pixel error / the mean predictor's). `--cpu-devices 1` runs it on one CPU device; by
default the batch is split over one device per core, as train.py does.
"""
from __future__ import annotations

import argparse
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--category", default="brick")
    p.add_argument("--tfds-dir", default=None)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--decoder", default="transposed", choices=("upsample", "transposed"))
    p.add_argument("--likelihood", default="gaussian", choices=("bce", "gaussian"))
    p.add_argument("--no-kl", action="store_true", help="a deterministic AE on the posterior mean")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--b1", type=float, default=0.5)
    from iepjax.cli import positive_int
    p.add_argument("--cpu-devices", type=positive_int, default=None, help="on CPU: JAX devices (default: one per core)")
    a = p.parse_args(argv)

    from iepjax import cpu_runtime
    cpu_runtime.use_cpu_cores(a.cpu_devices)  # before any JAX computation
    import jax

    from iepjax import data, sharding, training, training_step
    from iepjax.config import ModelConfig, TrainConfig
    from iepjax.data.preprocess import resize_images

    images = resize_images(data.load_split("textures", a.category, "train", a.tfds_dir, progress=False).images, a.size)
    model = ModelConfig(size=a.size, channels=1, decoder=a.decoder, likelihood=a.likelihood, use_kl=not a.no_kl)
    cfg = TrainConfig(model=model, steps=a.steps, batch_size=a.batch, learning_rate=a.lr, b1=a.b1)
    cpu_runtime.for_training(cfg, cpu_runtime.cpu_devices_chosen())  # as train.py: before the first JAX computation
    state = training_step.init_state(cfg, key=jax.random.key(cfg.seed))
    # the batch split over the devices, as train.py
    state, step_fn, put = sharding.training_on(sharding.make_mesh(divides=a.batch), state)
    t0 = time.perf_counter()
    for step in range(a.steps):
        idx = training_step.batch_indices(len(images), a.batch, cfg.seed, step)
        state, terms = step_fn(state, put(images[idx]), cfg)
        if (step + 1) % 50 == 0 or step == 0:
            t = jax.device_get(terms)
            print(f"step {step + 1} {time.perf_counter() - t0:.0f}s recon/px {float(t.recon) / images[0].size:.4f} "
                  f"kl {float(t.kl):.2f}", flush=True)
    print(training.collapse_check(state.params, images[:64], model), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
