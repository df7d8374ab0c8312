"""Training images/s: `iepjax.training.train_step` vs the same PyTorch train step (issue 5); JSON lines.

    python benchmarks/training.py --torch-python /work/torchvenv/bin/python
    python benchmarks/training.py --batch 32 --decoder transposed --steps 10
    python benchmarks/training.py --profile --batch 16 --decoder transposed   # where the JAX step's time goes
    python benchmarks/training.py --conv plain                               # flax/lax convolutions (iepjax.model)

Both sides: the method's VAE (`benchmarks/torch_reference.py`'s `VAE` for PyTorch), loss =
summed BCE + KL with z sampled by the reparameterisation trick, averaged over the batch,
Adam(2e-4, betas (0.5, 0.999)), the same batch of uint8 images converted to [0, 1], no
augmentation (TrainConfig(augment=False)). Each side runs in its own process: `--steps` timed
steps after `--warmup` untimed ones (JAX: the first compiles). PyTorch runs once per
`--torch-env` setting (see compare_torch.py); the ratio is against the fastest one.
Installs nothing: `--torch-python` must import torch (skipped with a note when it cannot).
JAX side: the batch is split over one CPU device per core (`--cpu-devices`, as in train.py), the
data-parallel step of `iepjax.sharding` (gradients averaged over the devices); PyTorch uses the
cores through its intra-op threads. Like train.py, the JAX side keeps freed host memory for reuse
when the step's XLA buffers are large (`iepjax.hostmem`; `--malloc` overrides it) and reports its
page faults and system time per step. `--conv` chooses the model's convolutions (default auto:
the XLA:CPU formulation on CPU, plain flax/lax elsewhere); the rows say which ran.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (CONV_HELP, CONVS, DEFAULT_REFERENCE, TORCH_ENVS, conv_fn, env, imports_torch, load_torch_reference,
                    median_seconds, positive_int, record_convs, use_conv)


def _host_memory(a, cfg, devices: int) -> bool:
    """glibc's malloc as `--malloc` says (auto: as train.py, `iepjax.hostmem.for_training`); True if reused."""
    from iepjax import hostmem
    if a.malloc == "auto":
        return hostmem.for_training(cfg, devices)
    return a.malloc == "reuse" and hostmem.reuse_freed_memory()


def jax_side(a) -> dict:
    import jax

    from iepjax import distributed
    from iepjax.config import ModelConfig, TrainConfig

    cfg = TrainConfig(model=ModelConfig(size=a.size, channels=a.channels, decoder=a.decoder),
                      batch_size=a.batch, augment=False)
    distributed.use_cpu_cores(a.cpu_devices)  # before any JAX computation
    reused = _host_memory(a, cfg, distributed.cpu_devices_chosen())
    impl = use_conv(a.conv)
    import numpy as np

    from iepjax import sharding, training
    state = training.init_state(cfg, key=jax.random.key(0))
    u8 = np.random.default_rng(0).integers(0, 256, (a.batch, a.size, a.size, a.channels), np.uint8)
    mesh = sharding.make_mesh(divides=a.batch)
    state, step, put = sharding.training_on(mesh, state)
    batch = put(u8)
    t0 = time.perf_counter()
    for _ in range(a.warmup):
        state, terms = step(state, batch, cfg)
    jax.block_until_ready(state)
    first = time.perf_counter() - t0
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(a.steps):
        state, terms = step(state, batch, cfg)
    jax.block_until_ready(state)
    dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {"impl": "iepjax", "conv": impl, "devices": 1 if mesh is None else int(mesh.size), "first_s": round(first, 3),
            "seconds": round(dt, 3), "img_per_s": round(a.batch * a.steps / dt, 2), "loss": float(terms.total),
            "host_memory_reused": reused,
            # the kernel's share: page faults and system CPU time per step (iepjax.hostmem)
            "page_faults_per_step": round((r1.ru_minflt - r0.ru_minflt) / a.steps),
            "sys_ms_per_step": round((r1.ru_stime - r0.ru_stime) / a.steps * 1e3, 1),
            "user_ms_per_step": round((r1.ru_utime - r0.ru_utime) / a.steps * 1e3, 1)}


def profile(a) -> list[dict]:
    """Where the time of one JAX train step goes, on one CPU device (the per-core work) by default.

    Rows: every convolution of the step (recorded while the step is traced, `common.record_convs`;
    transposed layers are one conv with input dilation), each timed alone on random inputs of its
    shapes as forward, input-gradient and kernel-gradient (with `--conv xla_cpu` the forms
    `xla_cpu_convs.conv`'s custom VJP uses, with plain JAX's own; median of `--steps` calls); then
    the whole step; then the step's op time by kind,
    summed from a `jax.profiler` trace (`ynn_fusion`: convolutions run by YNNPACK, `convolution`:
    by Eigen; transposes, selects (LeakyReLU), copies, ...). benchmarks/README.md, item 9.
    """
    import collections
    import gzip
    import re
    import tempfile

    import jax

    from iepjax import distributed
    from iepjax.config import ModelConfig, TrainConfig

    cfg = TrainConfig(model=ModelConfig(size=a.size, channels=a.channels, decoder=a.decoder),
                      batch_size=a.batch, augment=False)
    distributed.use_cpu_cores(a.cpu_devices or 1)  # before any JAX computation
    _host_memory(a, cfg, distributed.cpu_devices_chosen())
    import jax.numpy as jnp
    import numpy as np

    from iepjax import training, xla_cpu_convs
    impl = use_conv(a.conv)
    state = training.init_state(cfg, key=jax.random.key(0))
    batch = jax.device_put(np.random.default_rng(0).integers(0, 256, (a.batch, a.size, a.size, a.channels), np.uint8))
    raw = conv_fn(impl)
    calls = record_convs(lambda s, b: training.train_step(s, b, cfg), state, batch, batch=a.batch, conv=impl)

    def timed(f, *args):  # ms
        return median_seconds(f, *args, repeats=a.steps) * 1e3

    rows, rng, conv_ms = [], np.random.default_rng(1), 0.0
    for i, (xs, ws, st, pad, dil) in enumerate(calls):
        x = jnp.asarray(rng.random(xs, np.float32))
        w = jnp.asarray(rng.standard_normal(ws, np.float32) * 0.1)
        g = jnp.asarray(rng.standard_normal(jax.eval_shape(lambda x, w: raw(x, w, st, pad, dil), x, w).shape,
                                            np.float32))
        if impl == "xla_cpu":
            fwd = timed(jax.jit(lambda x, w: xla_cpu_convs._conv_raw(x, w, st, pad, dil)), x, w)
            dx = timed(jax.jit(lambda g, w: xla_cpu_convs.conv_input_grad(g, w, xs[1:3], st, pad, dil)), g, w)
            dw = timed(jax.jit(lambda x, w, g: xla_cpu_convs._conv_bwd(st, pad, dil, (x, w), g)[1]), x, w, g)
        else:  # JAX's own transposes of the lax convolution
            fwd = timed(jax.jit(lambda x, w: raw(x, w, st, pad, dil)), x, w)
            dx = timed(jax.jit(lambda x, w, g: jax.vjp(lambda x: raw(x, w, st, pad, dil), x)[1](g)[0]), x, w, g)
            dw = timed(jax.jit(lambda x, w, g: jax.vjp(lambda w: raw(x, w, st, pad, dil), w)[1](g)[0]), x, w, g)
        in_step = i > 0  # the step needs no gradient with respect to the data (the first layer's input)
        conv_ms += fwd + dw + (dx if in_step else 0.0)
        rows.append({"layer": i, "x": list(xs), "w": list(ws), "strides": list(st), "lhs_dilation": list(dil),
                     "fwd_ms": round(fwd, 2), "input_grad_ms": round(dx, 2), "kernel_grad_ms": round(dw, 2),
                     "input_grad_in_step": in_step})
    step = jax.jit(training.train_step, static_argnames="config")  # not donating: the state is reused
    ms = timed(lambda s, b: step(s, b, cfg)[1], state, batch)
    rows.append({"layer": "step", "devices": jax.device_count(), "batch": a.batch, "decoder": a.decoder, "conv": impl,
                 "ms": round(ms, 1), "img_per_s": round(a.batch / ms * 1e3, 1), "convs_ms": round(conv_ms, 1),
                 "rest_ms": round(ms - conv_ms, 1)})
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        for _ in range(a.steps):
            jax.block_until_ready(step(state, batch, cfg))
        jax.profiler.stop_trace()
        trace = json.load(gzip.open(next(Path(d).rglob("*.trace.json.gz"))))
    kinds = collections.Counter()
    for e in trace["traceEvents"] if isinstance(trace, dict) else trace:
        name = e.get("name", "")
        if e.get("ph") == "X" and re.fullmatch(r"[a-z_]+[.\d]*", name):  # XLA ops (not host-side events)
            kinds[re.sub(r"[.\d]+$", "", name)] += e.get("dur", 0) / 1e3 / a.steps
    rows.append({"op_kind_ms_per_step": {k: round(v, 1) for k, v in kinds.most_common(12)},
                 "op_total_ms": round(sum(kinds.values()), 1)})
    return rows


def torch_side(a) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    ref = load_torch_reference(a.torch_reference)
    torch.manual_seed(0)
    model = ref.VAE(a.channels, size=a.size, decoder=a.decoder).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.5, 0.999))
    u8 = np.random.default_rng(0).integers(0, 256, (a.batch, a.size, a.size, a.channels), np.uint8)
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float().div(255.0).contiguous()

    def step():
        h = model.encoder(x).flatten(1)
        mu, logvar = model.mu(h), model.logvar(h).clamp(-15.0, 8.0)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        rec = model.decoder(z[:, :, None, None])
        bce = F.binary_cross_entropy(rec, x, reduction="sum")
        kl = -0.5 * torch.sum(1 + logvar - mu ** 2 - logvar.exp())
        loss = (bce + kl) / x.shape[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    t0 = time.perf_counter()
    for _ in range(a.warmup):
        step()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    dt = time.perf_counter() - t0
    return {"impl": "torch-eager", "threads": torch.get_num_threads(), "first_s": round(first, 3),
            "seconds": round(dt, 3), "img_per_s": round(a.batch * a.steps / dt, 2), "loss": float(loss.detach())}


def _run(python: str, a, side: str, extra_env: dict) -> dict:
    cmd = [python, __file__, side, "--size", str(a.size), "--channels", str(a.channels), "--batch", str(a.batch),
           "--decoder", a.decoder, "--conv", a.conv, "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--torch-reference", str(a.torch_reference)]
    if a.cpu_devices is not None:
        cmd += ["--cpu-devices", str(a.cpu_devices)]
    cmd += ["--malloc", a.malloc]
    r = subprocess.run(cmd, env=env(extra_env), stdout=subprocess.PIPE, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode})")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=positive_int, default=128)
    p.add_argument("--channels", type=positive_int, default=3)
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--decoder", default="upsample", choices=["upsample", "transposed"])
    p.add_argument("--conv", default="auto", choices=CONVS, help="JAX side: " + CONV_HELP)
    p.add_argument("--steps", type=positive_int, default=5, help="timed train steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (JAX compiles in the first)")
    p.add_argument("--torch-env", nargs="+", default=["default", "passive", "1thread"], choices=sorted(TORCH_ENVS))
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="alternate the JAX and PyTorch runs this many times; with > 1 a last line gives the median "
                        "ratio (this machine's timings scatter by about 10 %% from run to run)")
    p.add_argument("--cpu-devices", type=positive_int, default=None,
                   help="JAX CPU devices the batch is split over (default: one per core, as train.py)")
    p.add_argument("--malloc", default="auto", choices=["auto", "reuse", "system"],
                   help="JAX side: glibc's malloc keeps freed memory for reuse (iepjax.hostmem): auto = as train.py "
                        "(when the step's buffers are large), reuse = always, system = never")
    p.add_argument("--torch-python", default=os.environ.get("TORCH_PYTHON", sys.executable))
    p.add_argument("--torch-reference", type=Path, default=DEFAULT_REFERENCE)
    p.add_argument("--profile", action="store_true",
                   help="JAX only: per-convolution times (forward / input-gradient / kernel-gradient) and op time by "
                        "kind of one train step, on one CPU device unless --cpu-devices (see `profile`)")
    p.add_argument("--jax-side", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--torch-side", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.profile:
        for row in profile(a):
            print(json.dumps(row), flush=True)
        return 0
    if a.jax_side or a.torch_side:
        print(json.dumps(jax_side(a) if a.jax_side else torch_side(a)), flush=True)
        return 0
    have_torch = imports_torch(a.torch_python) and a.torch_reference.exists()
    ratios = []
    for r in range(a.rounds):  # JAX and PyTorch alternate, so both sides see the same machine state
        row = {"size": a.size, "channels": a.channels, "batch": a.batch, "decoder": a.decoder, "steps": a.steps,
               "round": r + 1, "loadavg": round(os.getloadavg()[0], 2)}
        j = _run(sys.executable, a, "--jax-side", {})
        row["jax_img_per_s"], row["jax_devices"], row["jax_conv"] = j["img_per_s"], j["devices"], j["conv"]
        row.update(jax_host_memory_reused=j["host_memory_reused"], jax_page_faults_per_step=j["page_faults_per_step"],
                   jax_sys_ms_per_step=j["sys_ms_per_step"])
        if not have_torch:
            row["torch"] = f"skipped: {a.torch_python} cannot import torch or {a.torch_reference} is missing"
        else:
            t = {name: _run(a.torch_python, a, "--torch-side", TORCH_ENVS[name]) for name in a.torch_env}
            best = max(t, key=lambda k: t[k]["img_per_s"])
            row.update(torch_img_per_s={k: v["img_per_s"] for k, v in t.items()}, torch_best=best,
                       ratio=round(j["img_per_s"] / t[best]["img_per_s"], 3))
            ratios.append(row["ratio"])
        print(json.dumps(row), flush=True)
    if len(ratios) > 1:
        print(json.dumps({"decoder": a.decoder, "batch": a.batch, "rounds": len(ratios), "ratios": ratios,
                          "median_ratio": round(statistics.median(ratios), 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
