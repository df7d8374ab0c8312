"""Shared fixtures: a tiny model (32x32, 1 channel), its initial parameters, tiny data, a briefly
trained model, and strict JAX settings.

Strict settings: `jax_numpy_rank_promotion="raise"` (implicit rank promotion is an error).
Speed: a persistent XLA compilation cache in pytest's cache folder (.pytest_cache/d/jax_cache),
shared with the subprocesses of test_scripts.py (see `jax_cache_env`) and by the pytest-xdist
workers (one per core, see `SLOWEST_FIRST`). Within one run it lets the later script runs reuse
the programs the first compiled; reruns of the suite are several times faster.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# The suite's own process, and the workers it starts with its environment, build the model with the
# plain convolutions: the formulation GPUs and TPUs run, and the cheaper one to compile on XLA:CPU.
# The scripts' end-to-end runs (`env`) use each machine's default, as users run them: on a CPU the
# xla_cpu formulation. The two are checked equal layer by layer and for the whole model, values and
# gradients (tests/method/test_conv.py, test_model.py); the `conv` fixture runs a test with each.
# An IEPJAX_CONV set by whoever runs the suite is kept here (the scripts' runs set auto). Read by
# iepjax.model when it is imported.
os.environ.setdefault("IEPJAX_CONV", "plain")

from iepjax import ModelConfig, init_params  # noqa: E402
from iepjax.config import TrainConfig


def nested_jaxprs(jaxpr):
    """`jaxpr` and every jaxpr nested in its equations (pjit, scan, cond, custom_* ...), depth first."""
    from jax.extend import core as jcore
    yield jaxpr
    for eqn in jaxpr.eqns:
        for value in eqn.params.values():
            for item in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(item, jcore.ClosedJaxpr):
                    yield from nested_jaxprs(item.jaxpr)
                elif isinstance(item, jcore.Jaxpr):
                    yield from nested_jaxprs(item)


def central_differences(e_fn, x, eps: float, n: int = 3, seed: int = 11):
    """(v, (e_fn(x + eps v) - e_fn(x - eps v)) / 2 eps) along `n` random unit directions v (float64 checks
    of an energy's gradient: compare with vdot(grad, v))."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        v = rng.normal(size=x.shape)
        v /= np.linalg.norm(v)
        yield v, (float(e_fn(x + eps * v)) - float(e_fn(x - eps * v))) / (2 * eps)

jax.config.update("jax_numpy_rank_promotion", "raise")
# The suite's own process keeps one CPU device whatever the machine (the scripts' default is one per
# core, `cpu_runtime.use_cpu_cores`, which leaves an explicit choice alone); multi-device tests run
# subprocesses with XLA_FLAGS=--xla_force_host_platform_device_count=N.
jax.config.update("jax_num_cpu_devices", 1)

SIZE = 32
_CACHE_ENV: dict[str, str] = {}


# The suite runs on one pytest-xdist worker per core, at most 8, a test file to a worker (pyproject's
# addopts: `-n auto --maxprocesses 8 --dist loadfile --no-loadscope-reorder`; `-n 0` runs it in one
# process). More workers would not help: each holds a JAX runtime (~0.3 GB), and the slowest file
# alone takes an eighth of the suite's worker time. Files are handed out in collection order,
# so the slowest go first and the workers finish at about the same time (the seconds per file:
# docs/results.md, "Time of the test suite").
SLOWEST_FIRST = ("test_scripts.py",       # the tiny run (`tiny_run`), train.py again, killed train.py / project.py
                 "test_projection.py",
                 "test_comparison.py",    # reproduce.py's three models and ablations
                 "test_kills.py",         # train.py / project.py killed at random points, and rerun
                 "test_training.py",
                 "test_reliability.py",   # processes: other device counts, races, kills
                 "test_benchmarks.py",    # the benchmark scripts on tiny shapes
                 "test_export.py",        # export.py of the tiny run, then predict.py in a fresh process
                 "test_models.py",
                 "test_folder.py",        # reproduce.py end to end
                 "test_sharding.py",      # an 8-device subprocess
                 "test_model.py",
                 "test_energy.py",
                 "test_distributed.py",   # two processes
                 "test_conv.py")          # the other files take under 30 s each


def pytest_collection_modifyitems(config, items):
    """Order the collected tests by file, slowest file first (SLOWEST_FIRST); within a file, as written."""
    def rank(item) -> int:
        name = item.path.name
        return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)
    items.sort(key=rank)  # stable: the order inside each file is kept


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of the scripts (minutes); deselect with -m 'not slow'")
    cache = getattr(config, "cache", None)
    if cache is None:  # -p no:cacheprovider
        return
    path = str(cache.mkdir("jax_cache"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _CACHE_ENV.update(JAX_COMPILATION_CACHE_DIR=path, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


@pytest.fixture(scope="session")
def jax_cache_env() -> dict[str, str]:
    """Environment variables that give a subprocess the suite's compilation cache."""
    return dict(_CACHE_ENV)


ROOT = Path(__file__).resolve().parents[1]
SCRIPT_TIMEOUT = 600


@pytest.fixture(scope="session")
def env(jax_cache_env) -> dict[str, str]:
    """The environment of the scripts' end-to-end runs: the suite's compilation cache, this
    checkout on PYTHONPATH, each machine's default convolutions (IEPJAX_CONV=auto: xla_cpu on a
    CPU), and two CPU devices on every machine (the scripts' default is one per core: a fixed
    count makes the runs, and the float sums the batch split decides, the same everywhere, and
    tests the two-device path)."""
    e = dict(os.environ, **jax_cache_env)
    e.pop("IEPJAX_DATA_DIR", None)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    e["JAX_NUM_CPU_DEVICES"] = "2"
    e["IEPJAX_CONV"] = "auto"  # each machine's default, as users run the scripts
    e.pop("XLA_FLAGS", None)
    return e


def run_script(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """`python <args>` from the repository root, output captured (a script end to end)."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT)


def script_folder(out: str, label: str) -> Path:
    """The folder a script printed on its `<label>: <path>` line (e.g. "run folder", "output folder")."""
    import re
    m = re.search(rf"^{label}: (.+?)(?: \(.*\))?$", out, flags=re.M)
    assert m, f"no '{label}:' line in the output:\n{out}"
    return Path(m.group(1).strip())


# The suite's one tiny run of the real scripts on the built-in brick data (128x128 images, resized to
# the 32-pixel model): `tiny_run` trains and projects it once per pytest run, whatever the number of
# workers; the tests read it, and copy it (`copy_results`) before changing anything.
# --holdout 0.02: thresholds from the fewest held-out crops they need (11, not the 8 of 2 %, nor the 40
# of the default 10 %); --proj-steps 2: fitted for a 2-step projection (the preset's 100 steps would
# make the calibration most of train.py's work here).
TINY_TRAIN = ["--category", "brick", "--no-progress", "--size", "32", "--steps", "4", "--batch-size", "4",
              "--allow-collapse", "--holdout", "0.02", "--proj-steps", "2"]
# 3 steps without early stopping: a 4-step model's images would mostly stop at once (all-zero maps);
# other settings than train.py's, so project.py fits its own thresholds first.
TINY_PROJECT = ["--category", "brick", "--no-progress", "--steps", "3", "--no-early-stop", "--allow-collapse"]


def tiny_train_args(results: Path, tfds: Path, *extra: str) -> list[str]:
    """train.py's arguments of the tiny run, into `results`, data prepared in `tfds`."""
    return ["train.py", *TINY_TRAIN, "--results", str(results), "--tfds-dir", str(tfds), *extra]


def _build_tiny_run(root: Path, env: dict) -> dict:
    """Prepare the data (in this process), then train.py (timed: the work of a run on prepared data) and
    project.py as subprocesses; what they printed, as JSON-able values."""
    from iepjax.data import load_split

    tfds, results = root / "tfds", root / "results"
    load_split("textures", "brick", "train", str(tfds), progress=False)  # prepares the category
    t0 = time.monotonic()
    train = run_script(tiny_train_args(results, tfds), env)
    train_s = time.monotonic() - t0
    assert train.returncode == 0, train.stderr[-3000:]
    project = run_script(["project.py", *TINY_PROJECT, "--results", str(results), "--tfds-dir", str(tfds)], env)
    assert project.returncode == 0, project.stderr[-3000:]
    return dict(train_stdout=train.stdout, train_stderr=train.stderr, train_s=train_s,
                project_stdout=project.stdout, project_stderr=project.stderr)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, env) -> dict:
    """The suite's tiny trained and projected run (`TINY_TRAIN`, `TINY_PROJECT`), made once per pytest
    run: the pytest-xdist workers share it through a lock file in their common temporary folder (the
    first to need it builds it, the others wait and read it). Keys: tfds, results, run_dir, proj_dir
    (Paths), train_stdout, project_stdout, project_stderr, train_s (seconds train.py took). Read only:
    `copy_results` before running anything that writes."""
    import fcntl
    import json

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # shared by the workers
    folder, done, failed = root / "tiny_run", root / "tiny_run.json", root / "tiny_run.failed"
    with open(root / "tiny_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if failed.exists():
            pytest.fail(f"building the tiny run failed in another worker:\n{failed.read_text()}")
        if not done.exists():
            try:
                built = _build_tiny_run(folder, env)
            except BaseException as e:
                failed.write_text(f"{type(e).__name__}: {e}")
                raise
            done.write_text(json.dumps(built))
    out = json.loads(done.read_text())
    run_dir = script_folder(out["train_stdout"], "run folder")
    proj_dir = script_folder(out["project_stdout"], "output folder")
    return dict(out, tfds=folder / "tfds", results=folder / "results", run_dir=run_dir, proj_dir=proj_dir)


def copy_results(tiny: dict, dst: Path) -> tuple[Path, Path]:
    """A copy of the tiny run's results folder at `dst` (links kept); (results, run folder) of the copy."""
    import shutil
    shutil.copytree(tiny["results"], dst, symlinks=True)
    return dst, dst / tiny["run_dir"].relative_to(tiny["results"])


def bench_module(name: str):
    """`benchmarks/<name>.py` imported as module `name` (the scripts import `common` from their folder)."""
    import importlib
    import sys
    from pathlib import Path
    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, bench)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(bench)


@pytest.fixture(scope="session")
def libc():
    """glibc with `malloc`/`free` callable from ctypes (size_t / pointer arguments); skips elsewhere."""
    import ctypes

    from iepjax import cpu_runtime
    if cpu_runtime.glibc() is None:
        pytest.skip("glibc's malloc only")
    lib = ctypes.CDLL(None)
    lib.malloc.restype, lib.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    lib.free.argtypes = (ctypes.c_void_p,)
    return lib


CONVS = ("xla_cpu", "plain")  # the implementations of the model's convolutions (iepjax.model)


@pytest.fixture(params=CONVS)
def conv(request):
    """Run the test once per implementation of the model's convolutions ("xla_cpu", "plain"):
    every `VAE` without its own `conv` uses it (`iepjax.model.using_conv`), and jitted functions
    retrace for it. Requested by the tests whose result could depend on how the network is
    computed (the model's shapes and batch independence, the program's one scan, T=0). The
    energy's and the projection's maths given f, and jit against eager, run once, with the suite's
    default: the two implementations give the same f and gradients (tests/method/test_model.py,
    test_conv.py), and project_fn always runs them jitted.
    Fixtures of a wider scope (`params`, `trained`, ...) are made before it, with the suite's
    default (the plain convolutions, see the top of this file)."""
    from iepjax.model import using_conv
    with using_conv(request.param):
        yield request.param


@pytest.fixture(scope="session")
def model_cfg() -> ModelConfig:
    """The tiny model of the suite: 32x32 gray, BCE, upsampling decoder, VAE."""
    return ModelConfig(size=SIZE, channels=1)


@pytest.fixture(scope="session")
def params(model_cfg):
    """Initial parameters of VAE(model_cfg) (key 0)."""
    return init_params(model_cfg, key=jax.random.key(0))


def pattern_images(n: int, *, phase: float = 0.0, seed: int = 0, size: int = SIZE, channels: int = 1) -> np.ndarray:
    """n float32 images (n, size, size, channels) in [0, 1]: one oblique sinusoid, shifted per image, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    ims = [0.5 + 0.4 * np.sin(2 * np.pi * (2 * xx + yy) + 0.3 * i + phase) + 0.03 * rng.standard_normal((size, size))
           for i in range(n)]
    x = np.clip(np.stack(ims), 0.0, 1.0)[..., None]
    return np.repeat(x, channels, axis=-1).astype(np.float32)


@pytest.fixture(scope="session")
def images_u8() -> np.ndarray:
    """Six uint8 training images (6, 32, 32, 1) of the pattern."""
    return np.round(pattern_images(6) * 255).astype(np.uint8)


@pytest.fixture(scope="session")
def train_cfg(model_cfg) -> TrainConfig:
    """Tiny training settings (paper's Adam); the resume test trains 3 then 6 steps with them."""
    return TrainConfig(model=model_cfg, steps=6, batch_size=3, augment=False, checkpoint_every=3, log_every=3)


TRAIN_STEPS = 40


@pytest.fixture(scope="session")
def trained(train_cfg, images_u8):
    """(params, per-step training losses) after TRAIN_STEPS `train_step`s on `images_u8`."""
    from iepjax import training

    state = training.init_state(train_cfg, key=jax.random.key(train_cfg.seed))
    losses = []
    for step in range(TRAIN_STEPS):
        idx = training.batch_indices(len(images_u8), train_cfg.batch_size, train_cfg.seed, step)
        state, terms = training.train_step(state, jnp.asarray(images_u8[idx]), train_cfg)
        losses.append(float(terms.total))
    return state.params, np.asarray(losses)


def constant_decoder_params(params: dict, value: float, *, zero_posterior: bool = False) -> dict:
    """`params` of the upsampling-decoder VAE changed so that f(x) = `value` at every pixel, for every x.

    The decoder's last conv gets a zero kernel and bias logit(value). With `zero_posterior`, the
    mu and logvar heads are zeroed too, so q(z|x) = N(0, I) and KL = 0 (a fully collapsed VAE).
    """
    p = jax.tree.map(lambda a: a, params)  # a copy of the containers
    dec = dict(p["params"]["decoder"])
    last = max((k for k in dec if k.startswith("Conv_")), key=lambda k: int(k.split("_")[1]))
    dec[last] = {"kernel": jnp.zeros_like(dec[last]["kernel"]),
                 "bias": jnp.full_like(dec[last]["bias"], np.log(value / (1 - value)))}
    inner = dict(p["params"], decoder=dec)
    if zero_posterior:
        enc = dict(inner["encoder"])
        for head in ("mu", "logvar"):
            enc[head] = jax.tree.map(jnp.zeros_like, enc[head])
        inner["encoder"] = enc
    return dict(p, params=inner)


@pytest.fixture(scope="session")
def constant_params(params):
    """Factory fixture: `constant_decoder_params` of the initial parameters."""
    return lambda value, **kw: constant_decoder_params(params, value, **kw)
