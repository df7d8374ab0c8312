"""GPU: the batched iepjax projection against the PyTorch eager loop on the same GPU (issue 5); JSON lines.

    python benchmarks/gpu.py                          # a machine with an NVIDIA GPU, jax[cuda] and torch
    python benchmarks/gpu.py --size 32 --iters 2 --batch 1 2 --torch-images 1   # a quick check, any machine

JAX side: `iepjax.project_fn` (one jitted program: a `lax.scan` over the steps, vmapped over the
batch) for each `--batch` and each implementation of the model's convolutions (`--conv`: plain
flax/lax and the XLA:CPU formulation by default, iepjax.model), 128x128x3 and `--iters` steps by
default; the first call (compile + run) is timed apart, then the median of `--repeats` calls. PyTorch side: the `project` loop and
`VAE` of `benchmarks/torch_reference.py` (the same architecture and maths, see
compare_torch.py) moved to the same device: one image at a time as the public ports run it, and
the same loop on `--torch-batch` images at once. Each side runs in its own process (JAX's GPU
memory is not preallocated, so the sides never hold the card together). Both decoders by
default. A last line per decoder gives JAX's best throughput per convolution implementation
(`jax_by_conv`) and the best of all over the eager loop's, and over the batched PyTorch loop's. On a machine without a GPU, both sides run on the CPU (JAX on one
device): a check that the script works, not a GPU number.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import CONV_HELP, CONVS, DEFAULT_REFERENCE, env, imports_torch, load_torch_reference, positive_int, use_conv


def jax_side(a) -> list[dict]:
    import jax
    import numpy as np

    from iepjax import ModelConfig, ProjectionConfig, init_params, project_fn

    conv = use_conv(a.conv[0])
    model = ModelConfig(size=a.size, channels=a.channels, decoder=a.decoder)
    config = ProjectionConfig(model=model, steps=a.iters, alpha=0.5, lam=0.05)  # the reference's alpha, lam
    params = init_params(model, key=jax.random.key(0))
    dev = jax.devices()[0]
    rows = []
    for b in a.batch:
        x = jax.device_put(np.random.default_rng(b).random((b, a.size, a.size, a.channels), np.float32))
        t0 = time.perf_counter()
        jax.block_until_ready(project_fn(params, x, config))
        first = time.perf_counter() - t0
        ts = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(project_fn(params, x, config))
            ts.append(time.perf_counter() - t0)
        dt = statistics.median(ts)
        rows.append({"impl": "iepjax", "conv": conv, "platform": dev.platform, "device": dev.device_kind,
                     "decoder": a.decoder,
                     "size": a.size, "channels": a.channels, "iters": a.iters, "batch": b,
                     "first_call_s": round(first, 3), "seconds": round(dt, 4),
                     "img_per_s": round(b / dt, 2), "iter_img_per_s": round(b * a.iters / dt, 1)})
    return rows


def torch_side(a) -> list[dict]:
    import torch

    ref = load_torch_reference(a.torch_reference)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = ref.VAE(a.channels, size=a.size, decoder=a.decoder).to(dev).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    xs = torch.rand(max(a.torch_images, a.torch_batch), a.channels, a.size, a.size, device=dev)
    ref.project(model, xs[:1], 2)  # warm-up (cuDNN autotuning, allocator)
    ref.project(model, xs[:a.torch_batch], 2)
    sync()
    rows = []
    for b, n in ((1, a.torch_images), (a.torch_batch, a.torch_batch)):
        t0 = time.perf_counter()
        for i in range(0, n, b):
            ref.project(model, xs[i:i + b], a.iters)
        sync()
        dt = time.perf_counter() - t0
        rows.append({"impl": "torch-eager", "platform": dev.type,
                     "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                     "decoder": a.decoder, "size": a.size, "channels": a.channels, "iters": a.iters, "batch": b,
                     "images": n, "seconds": round(dt, 4), "img_per_s": round(n / dt, 2),
                     "iter_img_per_s": round(n * a.iters / dt, 1)})
    return rows


def _side(python: str, a, side: str, decoder: str, conv: str = "auto") -> list[dict]:
    cmd = [python, __file__, side, "--decoder", decoder, "--conv", conv, "--size", str(a.size),
           "--channels", str(a.channels),
           "--iters", str(a.iters), "--batch", *map(str, a.batch), "--repeats", str(a.repeats),
           "--torch-images", str(a.torch_images), "--torch-batch", str(a.torch_batch),
           "--torch-reference", str(a.torch_reference)]
    r = subprocess.run(cmd, env=env({"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}), stdout=subprocess.PIPE, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode})")
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=positive_int, default=128)
    p.add_argument("--channels", type=positive_int, default=3)
    p.add_argument("--iters", type=positive_int, default=100, help="projection steps (both sides)")
    p.add_argument("--batch", type=positive_int, nargs="+", default=[1, 16, 64, 256], help="JAX batch sizes")
    p.add_argument("--decoder", nargs="+", default=["upsample", "transposed"], choices=["upsample", "transposed"])
    p.add_argument("--conv", nargs="+", default=["plain", "xla_cpu"], choices=CONVS,
                   help="JAX side, each timed in turn: " + CONV_HELP)
    p.add_argument("--repeats", type=positive_int, default=5, help="JAX timed calls per batch (median)")
    p.add_argument("--torch-images", type=positive_int, default=16, help="images the eager loop projects one by one")
    p.add_argument("--torch-batch", type=positive_int, default=64, help="images of the batched PyTorch loop")
    p.add_argument("--torch-python", default=os.environ.get("TORCH_PYTHON", sys.executable))
    p.add_argument("--torch-reference", type=Path, default=DEFAULT_REFERENCE)
    p.add_argument("--jax-side", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--torch-side", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.jax_side or a.torch_side:
        a.decoder = a.decoder[0]
        for row in jax_side(a) if a.jax_side else torch_side(a):
            print(json.dumps(row), flush=True)
        return 0
    have_torch = imports_torch(a.torch_python) and a.torch_reference.exists()
    for decoder in a.decoder:
        jax_rows = []
        for conv in a.conv:
            rows = _side(sys.executable, a, "--jax-side", decoder, conv)
            for row in rows:
                print(json.dumps(row), flush=True)
            jax_rows += rows
        best = max(jax_rows, key=lambda r: r["iter_img_per_s"])
        by_conv = {}
        for row in jax_rows:
            if row["iter_img_per_s"] > by_conv.get(row["conv"], {}).get("iter_img_per_s", 0):
                by_conv[row["conv"]] = {"batch": row["batch"], "iter_img_per_s": row["iter_img_per_s"]}
        summary = {"decoder": decoder, "jax_best_conv": best["conv"], "jax_best_batch": best["batch"],
                   "jax_iter_img_per_s": best["iter_img_per_s"], "jax_by_conv": by_conv}
        if not have_torch:
            summary["torch"] = f"skipped: {a.torch_python} cannot import torch or {a.torch_reference} is missing"
        else:
            torch_rows = _side(a.torch_python, a, "--torch-side", decoder)
            for row in torch_rows:
                print(json.dumps(row), flush=True)
            eager, batched = torch_rows
            summary.update(torch_eager_iter_img_per_s=eager["iter_img_per_s"],
                           torch_batched_iter_img_per_s=batched["iter_img_per_s"],
                           ratio_vs_eager=round(best["iter_img_per_s"] / eager["iter_img_per_s"], 2),
                           ratio_vs_torch_batched=round(best["iter_img_per_s"] / batched["iter_img_per_s"], 2))
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
