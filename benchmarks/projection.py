"""Speed of `iepjax.project_fn` (issue 5): one JSON line per configuration.

    python benchmarks/projection.py                                   # 128x128x3, 100 steps, batch 16, both decoders
    python benchmarks/projection.py --iters 10 1000 --batch 1 --repeats 1     # compile time / memory vs steps
    python benchmarks/projection.py --batch 1 4 16 --iters 10                 # memory vs batch
    python benchmarks/projection.py --strategy scan hostloop                  # scan vs a host loop of jitted steps
    python benchmarks/projection.py --profile --decoder transposed            # time of each conv of one step
    python benchmarks/projection.py --conv plain xla_cpu                      # both convolution implementations

Every configuration runs in a fresh subprocess, so `peak_rss_mb` (the process's peak resident
memory: JAX runtime + compilation + buffers) and `compile_s` of different configurations are
comparable. Keys of each line:

  iter_img_per_s  image-steps per second in the steady state (batch * iters / median time of a call)
  img_per_s       projected images per second (batch / median time)
  compile_s       first call minus the steady-state call (tracing + lowering + XLA compilation)
  lower_compile_s `jax.jit(project_fn).lower(...).compile()` timed alone (after the timed calls; median
                  of 3): the compile time without the noise of a long first call
  peak_rss_mb     peak RSS of the subprocess after the timed calls (before any analysis)
  heap_growth_mb  most memory held from malloc during the timed calls (sampled every 20 ms, glibc's
                  `mallinfo2`) minus what was held before them: memory that grows with `iters` while a
                  call runs shows here even where malloc's free memory hides it from the RSS (None off
                  glibc; benchmarks/README.md, item 14)
  temp_mb         XLA's temporary-buffer size of the compiled projection (`memory_analysis()`)
  gflop_per_img_step  XLA cost analysis (`cost_analysis()["flops"]`) of ONE jitted, vmapped
                  `projection_step` divided by the batch. The cost analysis of the whole scan counts
                  the loop body once (it reports flops/iters), so the step's count times iters is used.
  gflops          achieved GFLOP/s = gflop_per_img_step * iter_img_per_s
  matmul_gflops   a jitted float32 2048x2048 matmul in the same subprocess, right after the timing
  conv            the model's convolutions it ran (`--conv`, resolved: "plain" or "xla_cpu"; iepjax.model)
  loadavg         1-minute load average when the configuration started (the machine may be shared)
  cpu_util        CPU seconds / wall seconds of this process during the timed calls (cores it used)
  devices         JAX devices the batch is split over (`--cpu-devices`, default one per core as in
                  train.py/project.py: XLA:CPU runs each convolution on one core, so a second device is
                  what puts the second core to work); the program is `project_fn` itself, fed a batch
                  sharded over the devices and replicated parameters (jit follows its inputs'
                  shardings). `temp_mb` is then per device.

`--strategy`: `scan` (what `project_fn` runs: one `lax.scan` in one XLA program) or `hostloop`: a benchmark-only
reference (not part of the API) that runs `jit(vmap(projection_step))` in a Python loop, i.e. each
step as a standalone XLA program, to show what the scan costs or saves.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import resource
import subprocess
import sys
import time

import common
from common import positive_int


def matmul_gflops(n: int = 2048, repeats: int = 7) -> float:
    """Median GFLOP/s of a jitted float32 n x n matmul."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    a = jnp.asarray(np.random.default_rng(0).random((n, n), np.float32))
    return 2 * n ** 3 / common.median_seconds(jax.jit(lambda a: a @ a), a, repeats=repeats) / 1e9


def _flops(compiled) -> float:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):  # older JAX: one dict per device
        ca = ca[0]
    return float(ca["flops"])


class HeapSampler:
    """Context manager: `growth` = the most bytes held from malloc while inside, minus the bytes held on
    entry (`iepjax.hostmem.heap_in_use`, sampled every `period` s by a thread); None off glibc."""

    def __init__(self, period: float = 0.02):
        self.period, self.growth = period, None

    def __enter__(self):
        import threading

        from iepjax import hostmem
        self._read = hostmem.heap_in_use
        self._start = self._read()
        if self._start is not None:
            self._peak, self._stop = self._start, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.period):
            self._peak = max(self._peak, self._read())

    def __exit__(self, *exc):
        if self._start is not None:
            self._stop.set()
            self._thread.join()
            self.growth = max(self._peak, self._read()) - self._start
        return False


def measure(size: int, channels: int, iters: int, batch: int, decoder: str, strategy: str, repeats: int,
            cpu_devices: int | None = None, conv: str = "auto") -> dict:
    """Time one configuration in this process (call it in a fresh process)."""
    import jax

    from iepjax import distributed
    distributed.use_cpu_cores(cpu_devices)  # before any JAX computation
    impl = common.use_conv(conv)
    import numpy as np

    from iepjax import ModelConfig, ProjectionConfig, init_params, project_fn, projection_step, sharding

    load = os.getloadavg()[0]
    model = ModelConfig(size=size, channels=channels, decoder=decoder)
    config = ProjectionConfig(model=model, steps=iters)
    params = init_params(model, key=jax.random.key(0))
    x0_host = np.random.default_rng(0).random((batch, size, size, channels), np.float32)
    mesh = sharding.make_mesh(divides=batch)
    if mesh is None:
        x0 = jax.device_put(x0_host)
    else:  # the batch split over the devices; project_fn's jit follows the inputs' shardings
        params = sharding.replicate(params, mesh)
        x0 = sharding.shard_batch(x0_host, mesh)
    step = jax.jit(jax.vmap(lambda x, x0: projection_step(params, x, x0, config)))

    if strategy == "hostloop":
        def run():
            x = x0
            for _ in range(iters):
                x, _ = step(x, x0)
            return jax.block_until_ready(x)
    else:
        def run():
            return jax.block_until_ready(project_fn(params, x0, config).x_T)

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    times = []
    heap = HeapSampler()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    with heap:
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_util = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / sum(times)
    dt = float(np.median(times))
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    # Analysis after the RSS reading, so its compilations do not count. Flops of the whole batch
    # from the unsplit program (a split one reports one device's share).
    host_params = jax.device_get(params)
    step_flops = _flops(jax.jit(jax.vmap(lambda x, x0: projection_step(host_params, x, x0, config)))
                        .lower(x0_host, x0_host).compile()) / batch
    compile_times = []
    for _ in range(3):  # median of 3 compilations; clear_caches so each one really compiles
        jax.clear_caches()
        t0 = time.perf_counter()
        whole = jax.jit(project_fn, static_argnames="config").lower(params, x0, config).compile()
        compile_times.append(time.perf_counter() - t0)
    lower_compile_s = float(np.median(compile_times))
    mem = whole.memory_analysis()
    temp_mb = None if mem is None else mem.temp_size_in_bytes / 2 ** 20
    scan_flops = _flops(whole) / batch * (1 if mesh is None else mesh.size)
    return {"size": size, "channels": channels, "iters": iters, "batch": batch, "decoder": decoder,
            "conv": impl, "strategy": strategy, "repeats": repeats,
            "iter_img_per_s": round(batch * iters / dt, 2), "img_per_s": round(batch / dt, 4),
            "seconds": round(dt, 4), "compile_s": round(first - dt, 3), "first_call_s": round(first, 3),
            "lower_compile_s": round(lower_compile_s, 3), "lower_compile_all_s": [round(t, 3) for t in compile_times],
            "peak_rss_mb": round(peak_rss_mb, 1),
            "heap_growth_mb": None if heap.growth is None else round(heap.growth / 2 ** 20, 1),
            "temp_mb": None if temp_mb is None else round(temp_mb, 2),
            "gflop_per_img_step": round(step_flops / 1e9, 4),
            "scan_cost_analysis_gflop_per_img": round(scan_flops / 1e9, 4),
            "gflops": round(step_flops * batch * iters / dt / 1e9, 2),
            "matmul_gflops": round(matmul_gflops(), 2),
            "devices": 1 if mesh is None else int(mesh.size),
            "platform": jax.devices()[0].platform, "cores": os.cpu_count(), "loadavg": round(load, 2),
            "cpu_util": round(cpu_util, 2), "jax": jax.__version__}


def profile(size: int, channels: int, batch: int, decoder: str, repeats: int, conv: str = "auto") -> list[dict]:
    """Where the time of one projection step goes: every convolution of the step, timed alone.

    The convolutions are recorded while one step is traced (`common.record_convs`; with the XLA:CPU
    implementation the upsampling layers appear as their sub-pixel phases), then each is jitted
    alone as forward + input-gradient (what the projection computes) with the implementation
    `conv` on random inputs of the recorded shapes and timed (median of `repeats`). The last row
    is the whole vmapped step; the time it spends outside the listed convolutions (activations,
    loss, interleaving of phases, the update) is its `rest_ms`.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from iepjax import ModelConfig, ProjectionConfig, init_params, projection_step
    impl = common.use_conv(conv)

    model = ModelConfig(size=size, channels=channels, decoder=decoder)
    config = ProjectionConfig(model=model, steps=1)
    params = init_params(model, key=jax.random.key(0))
    x0 = jax.device_put(np.random.default_rng(0).random((batch, size, size, channels), np.float32))
    raw = common.conv_fn(impl)
    step = jax.jit(jax.vmap(lambda x, x0: projection_step(params, x, x0, config)))
    calls = common.record_convs(step, x0, x0, batch=batch, conv=impl)
    timed = functools.partial(common.median_seconds, repeats=repeats)

    rows, rng, total_conv = [], np.random.default_rng(1), 0.0
    for i, (xs, ws, st, pad, dil) in enumerate(calls):
        x = jnp.asarray(rng.random(xs, np.float32))
        w = jnp.asarray(rng.standard_normal(ws, np.float32) * 0.1)

        def fwd_bwd(x, w, st=st, pad=pad, dil=dil):
            y, vjp = jax.vjp(lambda x: raw(x, w, st, pad, dil), x)
            return vjp(y)[0]

        f = jax.jit(fwd_bwd)
        dt = timed(f, x, w)
        flops = _flops(f.lower(x, w).compile())
        total_conv += dt
        rows.append({"layer": i, "x": list(xs), "w": list(ws), "strides": list(st), "lhs_dilation": list(dil),
                     "ms": round(dt * 1e3, 3), "gflop": round(flops / 1e9, 4), "gflops": round(flops / dt / 1e9, 1)})
    dt = timed(step, x0, x0)
    flops = _flops(step.lower(x0, x0).compile())
    rows.append({"layer": "step", "batch": batch, "decoder": decoder, "conv": impl, "ms": round(dt * 1e3, 3),
                 "gflop": round(flops / 1e9, 4), "gflops": round(flops / dt / 1e9, 1),
                 "convs_ms": round(total_conv * 1e3, 3), "rest_ms": round((dt - total_conv) * 1e3, 3),
                 "matmul_gflops": round(matmul_gflops(), 2)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=positive_int, nargs="+", default=[128])
    p.add_argument("--channels", type=positive_int, nargs="+", default=[3])
    p.add_argument("--iters", type=positive_int, nargs="+", default=[100])
    p.add_argument("--batch", type=positive_int, nargs="+", default=[16])
    p.add_argument("--decoder", nargs="+", default=["upsample", "transposed"], choices=["upsample", "transposed"])
    p.add_argument("--conv", nargs="+", default=["auto"], choices=common.CONVS, help=common.CONV_HELP)
    # `project_fn` has one strategy, the scan (measured faster than a host loop on CPU too).
    p.add_argument("--strategy", nargs="+", default=["scan"], choices=["scan", "hostloop"])
    p.add_argument("--repeats", type=positive_int, default=3, help="timed calls after the first (median reported)")
    p.add_argument("--profile", action="store_true",
                   help="per-convolution time of one step (first size/channels/batch/decoder), see `profile`")
    p.add_argument("--cpu-devices", type=positive_int, default=None,
                   help="CPU devices to split the batch over (default: one per core, as train.py/project.py; "
                        "1: the single-device program)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # run the single configuration here
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(measure(a.size[0], a.channels[0], a.iters[0], a.batch[0], a.decoder[0],
                                 a.strategy[0], a.repeats, a.cpu_devices, a.conv[0])), flush=True)
        return 0
    if a.profile:
        for row in profile(a.size[0], a.channels[0], a.batch[0], a.decoder[0], max(a.repeats, 5), a.conv[0]):
            print(json.dumps(row), flush=True)
        return 0
    env = common.env()
    rc = 0
    for size, ch, it, b, dec, conv, st in itertools.product(a.size, a.channels, a.iters, a.batch, a.decoder, a.conv,
                                                            a.strategy):
        cmd = [sys.executable, __file__, "--one", "--size", str(size), "--channels", str(ch), "--iters", str(it),
               "--batch", str(b), "--decoder", dec, "--conv", conv, "--strategy", st, "--repeats", str(a.repeats)]
        if a.cpu_devices is not None:
            cmd += ["--cpu-devices", str(a.cpu_devices)]
        r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        if r.returncode:
            rc = r.returncode
            print(json.dumps({"size": size, "channels": ch, "iters": it, "batch": b, "decoder": dec, "conv": conv,
                              "strategy": st, "error": f"exit {r.returncode}"}), flush=True)
        else:
            print(r.stdout.strip().splitlines()[-1], flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
