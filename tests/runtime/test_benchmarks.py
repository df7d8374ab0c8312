"""The benchmark scripts on tiny shapes: usage errors before any work, the rows they print, and
`--conv`, the implementation of the model's convolutions each JAX side runs (iepjax.model)."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("script,flag", [("training.py", "--rounds"), ("training.py", "--steps"),
                                         ("compare_torch.py", "--iters"), ("projection.py", "--batch"),
                                         ("sharding.py", "--devices")])
@pytest.mark.parametrize("value,says", [("0", "give 1 or more"), ("two", "is not a whole number")])
def test_counts_below_one_are_usage_errors(script, flag, value, says):
    r = subprocess.run([sys.executable, str(BENCH / script), flag, value], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    assert flag in r.stderr and says in r.stderr, r.stderr


@pytest.mark.parametrize("script", ["training.py", "compare_torch.py", "projection.py", "gpu.py"])
def test_conv_flag_takes_the_models_choices(script):
    r = subprocess.run([sys.executable, str(BENCH / script), "--conv", "cuda"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    assert "--conv" in r.stderr and "invalid choice" in r.stderr and "'plain', 'xla_cpu'" in r.stderr, r.stderr


def test_conv_choices_and_recorded_layers_match_the_model():
    """The scripts' `--conv` choices are the model's; `common.record_convs` lists the layers of a
    train step under either implementation (the transposed decoder's are the same convolutions)."""
    import jax
    import jax.numpy as jnp

    from conftest import bench_module
    from iepjax import model, training
    from iepjax.config import ModelConfig, TrainConfig
    common = bench_module("common")
    assert common.CONVS == model.CONV_CHOICES
    cfg = TrainConfig(model=ModelConfig(size=32, channels=3, decoder="transposed"), batch_size=2, augment=False)
    state = jax.eval_shape(lambda: training.init_state(cfg, key=jax.random.key(0)))
    batch = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.uint8)
    calls = {conv: common.record_convs(lambda s, b: training.train_step(s, b, cfg), state, batch, batch=2, conv=conv)
             for conv in ("xla_cpu", "plain")}
    assert len(calls["xla_cpu"]) == 18  # 9 encoder + 9 decoder convolutions
    assert calls["plain"] == calls["xla_cpu"]


def test_projection_reports_a_row_with_the_heap_growth():
    """`benchmarks/projection.py` runs one configuration on tiny shapes (here with the plain convolutions,
    `--conv plain`) and prints its row; `heap_growth_mb` (benchmarks/README.md, item 14) is measured on glibc and None elsewhere."""
    import json

    from iepjax import cpu_runtime
    r = subprocess.run([sys.executable, str(BENCH / "projection.py"), "--size", "32", "--iters", "3", "--batch",
                        "2", "--repeats", "1", "--decoder", "transposed", "--cpu-devices", "1", "--conv", "plain"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.splitlines()[-1])
    assert (row["size"], row["iters"], row["batch"], row["devices"], row["conv"]) == (32, 3, 2, 1, "plain")
    assert row["iter_img_per_s"] > 0 and row["peak_rss_mb"] > 0 and row["lower_compile_s"] > 0
    if cpu_runtime.glibc() is None:
        assert row["heap_growth_mb"] is None
    else:
        assert 0 <= row["heap_growth_mb"] < 100, row  # a 3-step projection of 32 px images holds no more


def test_heap_sampler_sees_a_block_held_for_a_while(libc):
    """`projection.HeapSampler` reports a 16 MiB block that was held for 0.1 s and freed before the end."""
    import time

    from conftest import bench_module
    projection = bench_module("projection")
    with projection.HeapSampler(period=0.005) as held:
        p = libc.malloc(16 * 2 ** 20)
        time.sleep(0.1)
        libc.free(p)
    with projection.HeapSampler(period=0.005) as idle:
        time.sleep(0.1)
    assert 16 * 2 ** 20 <= held.growth < 18 * 2 ** 20, held.growth
    assert idle.growth < 2 ** 20, idle.growth


def test_training_profile_lists_every_conv_and_the_step():
    """`benchmarks/training.py --profile` (benchmarks/README.md, item 9) runs on tiny shapes: one row per
    convolution of the train step with its three timings, the step, and the op time by kind."""
    import json
    r = subprocess.run([sys.executable, str(BENCH / "training.py"), "--profile", "--size", "32", "--batch", "2",
                        "--decoder", "transposed", "--steps", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    convs = [row for row in rows if isinstance(row.get("layer"), int)]
    assert len(convs) == 18  # 9 encoder + 9 decoder convolutions of the method's VAE
    assert all(row["fwd_ms"] > 0 and row["kernel_grad_ms"] > 0 for row in convs)
    assert [row["input_grad_in_step"] for row in convs] == [False] + [True] * 17
    step = next(row for row in rows if row.get("layer") == "step")
    assert step["devices"] == 1 and step["ms"] > 0
    assert rows[-1]["op_total_ms"] > 0 and rows[-1]["op_kind_ms_per_step"]


def test_gpu_script_runs_on_any_machine_and_reports_each_batch():
    """`benchmarks/gpu.py` (the prepared GPU check) runs on CPU on tiny shapes, with both implementations of the
    model's convolutions by default; without torch (here: no such interpreter) the PyTorch side is
    skipped with a note, never silently."""
    import json
    r = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--size", "32", "--iters", "2", "--batch", "1", "2",
                        "--repeats", "1", "--decoder", "transposed", "--torch-python", str(BENCH / "no_such_python")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    jax_rows = [row for row in rows if row.get("impl") == "iepjax"]
    assert [(row["conv"], row["batch"]) for row in jax_rows] == [("plain", 1), ("plain", 2), ("xla_cpu", 1), ("xla_cpu", 2)]
    assert all(row["iter_img_per_s"] > 0 and row["first_call_s"] > 0 for row in jax_rows)
    assert rows[-1]["decoder"] == "transposed" and "skipped" in rows[-1]["torch"]
    assert set(rows[-1]["jax_by_conv"]) == {"plain", "xla_cpu"} and rows[-1]["jax_best_conv"] in ("plain", "xla_cpu")


def test_training_reports_the_kernels_share_and_the_malloc_setting():
    """`benchmarks/training.py` (benchmarks/README.md, item 12): the JAX row carries page faults and system
    time per step and whether freed host memory was kept for reuse (`--malloc reuse` forces it, `auto`
    follows train.py: not at 32 px)."""
    import json

    from iepjax import cpu_runtime

    rows = {}
    for malloc, conv in (("reuse", "plain"), ("auto", "auto")):  # and the --conv flag: plain, then auto
        r = subprocess.run([sys.executable, str(BENCH / "training.py"), "--size", "32", "--channels", "1", "--batch",
                            "2", "--steps", "1", "--warmup", "1", "--malloc", malloc, "--conv", conv, "--torch-python",
                            str(BENCH / "no_such_python")], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        rows[malloc] = json.loads(r.stdout.splitlines()[-1])
    for row in rows.values():
        assert row["jax_img_per_s"] > 0 and row["jax_page_faults_per_step"] >= 0 and row["jax_sys_ms_per_step"] >= 0
        assert "skipped" in row["torch"]
    assert rows["reuse"]["jax_host_memory_reused"] is (cpu_runtime.glibc() is not None)
    assert rows["auto"]["jax_host_memory_reused"] is False
    assert (rows["reuse"]["jax_conv"], rows["auto"]["jax_conv"]) == ("plain", "xla_cpu")


@pytest.mark.parametrize("decoder,likelihood,lam", [("upsample", "bce", 0.0), ("transposed", "gaussian", 0.05)])
def test_torch_reference_agrees_with_iepjax(decoder, likelihood, lam):
    """`benchmarks/torch_reference.py` loads iepjax's parameters and gives the same f(x0), E(x0) and x_T after
    five steps of the paper's loop (no backtracking), to float32 rounding; with lam > 0 both take the
    least-magnitude subgradient at x = x0. log_gamma is moved off its initial 0 so its copy is checked too.
    Skipped without torch (the `bench` extra)."""
    pytest.importorskip("torch")
    import jax
    import numpy as np

    from conftest import bench_module
    from iepjax import ModelConfig, ProjectionConfig, init_params, project_fn, reconstruct
    from iepjax.energy import energy
    ref = bench_module("torch_reference")
    model = ModelConfig(size=32, channels=3, decoder=decoder, likelihood=likelihood)
    cfg = ProjectionConfig(model=model, steps=5, alpha=0.5, lam=lam, backtrack=False)
    params = init_params(model, key=jax.random.key(1))
    if likelihood == "gaussian":
        params = {"params": {**params["params"], "log_gamma": jax.numpy.asarray(-0.5)}}
    x0 = np.random.default_rng(0).random((2, 32, 32, 3), np.float32)
    x_T = np.asarray(project_fn(params, x0, cfg).x_T)
    f0 = np.asarray(jax.vmap(lambda x: reconstruct(params, x, cfg))(x0))
    e0 = np.asarray(jax.vmap(lambda x: energy(params, x, x, cfg)[0])(x0))
    torch_model = ref.load_flax_params(ref.VAE(3, size=32, decoder=decoder, likelihood=likelihood).eval(), params)
    diffs = ref.agreement(torch_model, x0, f0, e0, x_T, steps=5, alpha=0.5, lam=lam)
    assert diffs["mean_abs_update_x_T"] > 1e-3, diffs  # the images moved
    assert diffs["max_abs_diff_f_x0"] < 1e-6 and diffs["max_abs_diff_x_T"] < 1e-5, diffs
    assert diffs["max_rel_diff_energy_x0"] < 1e-5, diffs
