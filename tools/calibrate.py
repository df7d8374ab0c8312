"""Calibrate the projection settings (T, alpha, lam, sigma, weighting, KL) of a trained run.

    python tools/calibrate.py --category brick                        # the default grid
    python tools/calibrate.py --category brick --grid 100,0.02,0.05,1,1,1 50,0.05,0.05,2,1,1

Scores each setting on the test split of the built-in data drawn with ANOTHER seed (--data-seed,
default 1: the same photo region, other crops and other defects), never on the split that
`project.py` reports, so the README's numbers are not tuned on their own test set. Prints one
JSON line per setting: the recon and grad rows (pixel AUROC, image AUROC, AU-PRO) and the mean
energy at steps 0, T/2 and T (a rising energy means alpha is too large).

A grid entry is "T,alpha,lam,sigma,weighting,use_kl" (weighting and use_kl are 0 or 1). With
--relative it is "T,step,hold,sigma,weighting,use_kl": alpha and lam are resolved in the model's own
loss units on the run's held-out normal images (iepjax.loss_scale, as project.py --step --hold),
and the printed row gives the resolved values. --model picks the run of an AE (ae_l2, ae_ssim).

    python tools/calibrate.py --category brick --model ae_ssim --relative --grid 100,1e-3,0.37,1,1,0
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

DEFAULT_GRID = ["100,0.02,10,1,1,1", "100,0.02,0.05,1,1,1", "100,0.02,2,1,1,1", "100,0.02,30,1,1,1",
                "100,0.02,10,2,1,1", "100,0.01,10,1,1,1", "200,0.02,10,1,1,1", "100,0.05,10,1,1,1",
                "100,0.02,10,1,1,0", "100,0.002,10,1,0,1"]


def main(argv=None) -> int:
    from iepjax.cli import positive_int

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="textures")
    p.add_argument("--category", default="brick")
    p.add_argument("--results", default="results")
    p.add_argument("--run", default=None, help="run folder (default: the category's latest)")
    p.add_argument("--model", default="vae", choices=("vae", "ae_l2", "ae_ssim"), help="the run's model (default vae)")
    p.add_argument("--relative", action="store_true",
                   help="grid entries give step and hold (the model's units) instead of alpha and lam")
    p.add_argument("--gradient", default="full", choices=("full", "detached"), help="the projection's gradient")
    p.add_argument("--tfds-dir", default=None)
    p.add_argument("--data-seed", type=int, default=1, help="seed of the calibration split (0 is the reported one)")
    p.add_argument("--grid", nargs="+", default=DEFAULT_GRID, help="T,alpha,lam,sigma,weighting,use_kl entries")
    p.add_argument("--no-early-stop", action="store_true",
                   help="always take T steps (default, as project.py: stop at the held-out normal images' lowest loss)")
    p.add_argument("--cpu-devices", type=positive_int, default=None, help="on CPU: JAX devices (default: one per core)")
    a = p.parse_args(argv)

    from iepjax import cpu_runtime
    cpu_runtime.use_cpu_cores(a.cpu_devices)  # before any JAX computation
    from iepjax import data, loss_scale, runs, sharding
    from iepjax.config import ProjectionConfig
    from iepjax.data.preprocess import Preprocess, model_inputs, resize_images, resize_masks
    from iepjax.early_stop import with_early_stop
    from iepjax.localization import localize, localize_images
    from iepjax.scoring import official_metrics, score
    from iepjax.thresholds import held_out_images
    from iepjax.training import load_params

    run_dir = runs.find_run(a.results, a.model, a.dataset, a.category, a.run)
    params, tcfg = load_params(run_dir)
    prep = Preprocess.load(run_dir)  # the run's preprocessing (resize or tiling), as project.py uses it
    test = data.load_split(a.dataset, a.category, "test", a.tfds_dir, progress=False,
                           **({"seed": a.data_seed} if a.data_seed else {}))
    normal = held_out_images(run_dir, a.dataset, a.category, a.tfds_dir)
    normal_x = None
    if a.relative:  # the held-out normal images as model inputs, in [0, 1] (as project.py --hold / --step)
        x = model_inputs(normal, prep)[0] if prep is not None else resize_images(normal, tcfg.model.size)
        normal_x = np.asarray(x, np.float32) / 255.0
    mesh = sharding.make_mesh()  # the batch split over the devices
    for spec in a.grid:
        t, alpha, lam, sigma, weighting, use_kl = spec.split(",")
        cfg = ProjectionConfig(model=tcfg.model, steps=int(t), alpha=float(alpha), lam=float(lam),
                               smoothing_sigma=float(sigma), weighting=weighting == "1", use_kl=use_kl == "1",
                               gradient=a.gradient)
        relative = None
        if a.relative:  # the entry's 2nd and 3rd numbers are step and hold
            relative = {"step": float(alpha), "hold": float(lam)}
            cfg, _ = loss_scale.resolve(params, dataclasses.replace(cfg, **relative), normal_x)
        if not a.no_early_stop:
            cfg = with_early_stop(params, cfg, normal, prep)
        t0 = time.perf_counter()
        if prep is not None:  # maps at the original image sizes (the official protocol)
            res = localize_images(params, cfg, test.images, prep, progress=False, mesh=mesh)
            scores, e = official_metrics(res.maps, test), res.loc.energies.mean(axis=0)
        else:
            size = tcfg.model.size
            loc = localize(params, resize_images(test.images, size), cfg, progress=False, mesh=mesh)
            masks = resize_masks(test.masks, size)
            scores = {"recon": score(loc.recon_maps, masks, test.labels), "grad": score(loc.grad_maps, masks, test.labels)}
            e = loc.energies.mean(axis=0)
        row = {"run": str(run_dir), "model": a.model, "data_seed": a.data_seed, "gradient": cfg.gradient,
               **(relative or {}),
               "steps": cfg.steps, "alpha": cfg.alpha, "lam": cfg.lam,
               "sigma": cfg.smoothing_sigma, "weighting": cfg.weighting, "use_kl": cfg.use_kl,
               "stop_loss": cfg.stop_loss,
               "recon": scores["recon"], "grad": scores["grad"],
               "energy": [float(e[0]), float(e[len(e) // 2]), float(e[-1])] if len(e) else [],
               "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
