"""iepjax's projection side by side with the PyTorch eager loop; prints JSON lines.

    python benchmarks/compare_torch.py --torch-python /work/torchvenv/bin/python
    python benchmarks/compare_torch.py --torch-python ... --decoder transposed --batch 16 --iters 100
    python benchmarks/compare_torch.py --torch-python ... --check      # same maths? (weights copied)
    python benchmarks/compare_torch.py --torch-python ... --conv plain # the model's plain flax/lax convolutions

Installs nothing: `--torch-python` (default: this interpreter, or $TORCH_PYTHON) must import torch,
e.g. a separate venv made with `python3 -m venv V && V/bin/pip install torch==2.13.0`.

Timing: for each decoder, the JAX projection (`benchmarks/projection.py`, fresh process, batch
`--batch`) and `benchmarks/torch_reference.py` (batch 1, the same size, channels, steps and
decoder, gradient through the network) run one after the other in this run. The reference runs
once per `--torch-env` setting (default: PyTorch's defaults, and OMP_WAIT_POLICY=PASSIVE, which
stops OpenMP from spin-waiting when another process shares the cores); the ratio is taken
against the FASTEST PyTorch setting. One JSON line per decoder with both throughputs and
`ratio` = JAX image-steps/s / PyTorch image-steps/s.

`--check`: copies the JAX model's initial parameters into the reference's `VAE`
(`torch_reference.load_flax_params` converts the kernel layouts), runs `--check-steps` steps of the
paper's loop (no backtracking) on the same images in both, and prints the maximum differences of
f(x0), E(x0) and x_T (`torch_reference.agreement`). At x = x0 the reference keeps PyTorch's
subgradient 0 of |x - x0| and iepjax takes the least-magnitude one, so with `--check-lam` > 0
they differ by design; `tests/runtime/test_benchmarks.py` checks that rule too.

JAX side: the batch is split over one CPU device per core (`--cpu-devices`, as in the scripts):
XLA:CPU runs each convolution on one core, PyTorch uses the cores through its intra-op threads.
`--conv` chooses the model's convolutions (iepjax.model; default auto: the XLA:CPU formulation on
CPU, plain flax/lax elsewhere), for the timing and the check alike; `jax_conv` says which ran.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (CONV_HELP, CONVS, DEFAULT_REFERENCE, ROOT, TORCH_ENVS, imports_torch, load_torch_reference,
                    positive_int, use_conv)
from common import env as _env


def _last_json(cmd: list[str], env: dict) -> dict:
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def compare(a) -> int:
    for dec in a.decoder:
        jax_row = _last_json([sys.executable, str(ROOT / "benchmarks" / "projection.py"), "--size", str(a.size),
                              "--channels", str(a.channels), "--iters", str(a.iters), "--batch", str(a.batch),
                              "--decoder", dec, "--conv", a.conv, "--repeats", str(a.repeats)]
                             + ([] if a.cpu_devices is None else ["--cpu-devices", str(a.cpu_devices)]), _env())
        torch_rows = {}
        for name in a.torch_env:
            torch_rows[name] = _last_json(
                [a.torch_python, str(a.torch_reference), "--size", str(a.size), "--channels", str(a.channels),
                 "--iters", str(a.iters), "--batch", "1", "--images", str(a.torch_images), "--decoder", dec],
                _env(TORCH_ENVS[name]))
        best = max(torch_rows, key=lambda k: torch_rows[k]["iter_img_per_s"])
        tb = torch_rows[best]["iter_img_per_s"]
        print(json.dumps({
            "size": a.size, "channels": a.channels, "iters": a.iters, "decoder": dec, "jax_conv": jax_row["conv"],
            "jax_batch": a.batch, "jax_devices": jax_row["devices"], "jax_iter_img_per_s": jax_row["iter_img_per_s"], "jax_img_per_s": jax_row["img_per_s"],
            "jax_gflops": jax_row["gflops"], "matmul_gflops": jax_row["matmul_gflops"],
            "torch_batch": 1, "torch_iter_img_per_s": {k: v["iter_img_per_s"] for k, v in torch_rows.items()},
            "torch_best": best, "torch_threads": torch_rows[best]["threads"],
            "ratio": round(jax_row["iter_img_per_s"] / tb, 3),
            "ratio_vs_torch_default": round(jax_row["iter_img_per_s"] / torch_rows[a.torch_env[0]]["iter_img_per_s"], 3),
            "loadavg": jax_row["loadavg"]}), flush=True)
    return 0


# ----------------------------------------------------------------------------- same-maths check
def _jax_side(a, dec: str, npz: str) -> None:
    """Write initial params (torch layout), x0, and the JAX results to `npz`."""
    import jax
    import numpy as np

    from iepjax import ModelConfig, ProjectionConfig, init_params, project_fn, reconstruct
    from iepjax.energy import energy

    conv = use_conv(a.conv)
    model = ModelConfig(size=a.size, channels=a.channels, decoder=dec)
    # the reference is the paper's plain loop: no backtracking safeguard (ProjectionConfig.backtrack)
    cfg = ProjectionConfig(model=model, steps=a.check_steps, lam=a.check_lam, alpha=a.check_alpha, backtrack=False)
    params = init_params(model, key=jax.random.key(1))
    x0 = np.random.default_rng(0).random((2, a.size, a.size, a.channels), np.float32)
    res = project_fn(params, x0, cfg)
    f0 = jax.vmap(lambda x: reconstruct(params, x, cfg))(x0)
    e0 = jax.vmap(lambda x: energy(params, x, x, cfg)[0])(x0)  # prior term 0 at x = x0
    # iepjax's parameters as they are ("params/encoder/Conv_0/kernel", ...): torch_reference converts them
    out = {"/".join(str(k.key) for k in path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(npz, x0=x0, x_T=np.asarray(res.x_T), f0=np.asarray(f0), e0=np.asarray(e0), jax_conv=np.array(conv), **out)


def _torch_side(a, dec: str, npz: str) -> None:
    """Load the JAX params into torch_reference.VAE, run the reference's `project`, print differences."""
    import numpy as np

    ref = load_torch_reference(a.torch_reference)
    d = np.load(npz)
    model = ref.load_flax_params(ref.VAE(a.channels, size=a.size, decoder=dec).eval(),
                                 {k: d[k] for k in d.files if k.startswith("params/")})
    # least_magnitude=False: the reference's own rule at x = x0 (PyTorch's sign(0) = 0), see --check-lam
    diffs = ref.agreement(model, d["x0"], d["f0"], d["e0"], d["x_T"], a.check_steps, a.check_alpha, a.check_lam,
                          least_magnitude=False)
    print(json.dumps({"decoder": dec, "jax_conv": str(d["jax_conv"]), "size": a.size, "channels": a.channels, "steps": a.check_steps, "alpha": a.check_alpha, "lam": a.check_lam,
                      "n_params_torch": sum(p.numel() for p in model.parameters()), **diffs}), flush=True)


def check(a) -> int:
    for dec in a.decoder:
        with tempfile.TemporaryDirectory() as tmp:
            npz = os.path.join(tmp, "check.npz")
            common = ["--size", str(a.size), "--channels", str(a.channels), "--conv", a.conv,
                      "--check-steps", str(a.check_steps),
                      "--check-lam", str(a.check_lam), "--check-alpha", str(a.check_alpha),
                      "--decoder", dec, "--torch-reference", str(a.torch_reference)]
            subprocess.run([sys.executable, __file__, "--jax-side", npz] + common, env=_env(), check=True)
            subprocess.run([a.torch_python, __file__, "--torch-side", npz] + common, env=_env(), check=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=positive_int, default=128)
    p.add_argument("--channels", type=positive_int, default=3)
    p.add_argument("--iters", type=positive_int, default=100, help="projection steps (both sides)")
    p.add_argument("--batch", type=positive_int, default=16, help="JAX batch (the reference always uses 1)")
    p.add_argument("--decoder", nargs="+", default=["upsample", "transposed"], choices=["upsample", "transposed"])
    p.add_argument("--repeats", type=positive_int, default=3, help="JAX timed calls (median)")
    p.add_argument("--conv", default="auto", choices=CONVS, help="JAX side: " + CONV_HELP)
    p.add_argument("--cpu-devices", type=positive_int, default=None,
                   help="JAX CPU devices the batch is split over (default: one per core, like the scripts; PyTorch "
                        "uses the cores through its own threads)")
    p.add_argument("--torch-images", type=positive_int, default=4, help="images the reference projects (timed)")
    p.add_argument("--torch-env", nargs="+", default=["default", "passive"], choices=sorted(TORCH_ENVS))
    p.add_argument("--torch-python", default=os.environ.get("TORCH_PYTHON", sys.executable))
    p.add_argument("--torch-reference", type=Path, default=DEFAULT_REFERENCE)
    p.add_argument("--check", action="store_true", help="compare the maths instead of timing")
    p.add_argument("--check-steps", type=positive_int, default=5)
    p.add_argument("--check-lam", type=float, default=0.0,
                   help="lam of the check (default 0: no L1 prior; with lam > 0 the first step differs by design "
                        "where |grad L_r| <= lam: iepjax keeps those pixels at x0, the reference's sign(0) = 0 moves them)")
    p.add_argument("--check-alpha", type=float, default=0.5, help="step size of the check (the reference's default)")
    p.add_argument("--jax-side", help=argparse.SUPPRESS)
    p.add_argument("--torch-side", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.jax_side:
        return _jax_side(a, a.decoder[0], a.jax_side) or 0
    if a.torch_side:
        return _torch_side(a, a.decoder[0], a.torch_side) or 0
    if not a.torch_reference.exists():
        raise SystemExit(f"{a.torch_reference} not found: pass --torch-reference PATH")
    if not imports_torch(a.torch_python):
        raise SystemExit(f"{a.torch_python} cannot import torch: install it in a separate venv "
                         "(python3 -m venv V && V/bin/pip install torch) and pass --torch-python V/bin/python")
    return check(a) if a.check else compare(a)


if __name__ == "__main__":
    sys.exit(main())
