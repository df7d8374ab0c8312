"""iepjax.cpu_runtime: one CPU device per core, glibc's malloc keeping freed memory for reuse (and
when training asks for it), the advice on long projections; only the scripts import it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from iepjax import cpu_runtime, training_step
from iepjax.config import ModelConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[2]
GLIBC = cpu_runtime.glibc() is not None

# A worker thread mallocs 96 MiB, writes it, frees it, and does it again; the page faults of the
# second round say whether the pages were kept (XLA:CPU's worker threads allocate and free each
# step's temporary buffer the same way; numpy is not used: it asks for huge pages).
_FAULTS = """
import ctypes, json, resource, sys, threading
from iepjax import cpu_runtime
applied = cpu_runtime.reuse_freed_memory() if sys.argv[1] == "reuse" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
n = 96 * 2 ** 20
out = {}
def work():
    for r in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        libc.free(p)
        out[r] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
t = threading.Thread(target=work)
t.start(); t.join()
print(json.dumps({"applied": applied, "second_round_faults": out[1], "pages": n // 4096}))
"""


def _faults(mode: str) -> dict:
    r = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _thp_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_reuse_freed_memory_keeps_a_worker_threads_pages():
    kept = _faults("reuse")
    assert kept["applied"] is True
    assert kept["second_round_faults"] < kept["pages"] // 20, kept  # the pages of the first round, reused
    if not _thp_always():  # with huge pages a fresh mapping faults once per 2 MiB, not per page
        fresh = _faults("system")
        assert fresh["applied"] is False
        assert fresh["second_round_faults"] > kept["pages"] // 2, fresh  # mapped and faulted in again


def test_reuse_freed_memory_is_a_no_op_off_glibc(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert cpu_runtime.reuse_freed_memory() is False
    assert cpu_runtime.heap_in_use() is None


def test_heap_in_use_counts_a_block_until_it_is_freed(libc):
    """An 8 MiB malloc adds 8 MiB (plus its header) to `heap_in_use`; its free takes them off again."""
    n = 8 * 2 ** 20
    before = cpu_runtime.heap_in_use()
    p = libc.malloc(n)
    held = cpu_runtime.heap_in_use() - before
    libc.free(p)
    after = cpu_runtime.heap_in_use() - before
    assert n <= held < n + 2 ** 20, held  # other threads may allocate meanwhile: 1 MiB of slack
    assert abs(after) < 2 ** 20, after


def test_train_temp_bytes_splits_the_batch_as_the_mesh_does():
    cfg = TrainConfig(model=ModelConfig(size=128), batch_size=32)
    assert cpu_runtime.train_temp_bytes(cfg, 1) == 32 * 128 ** 2 * cpu_runtime.TRAIN_TEMP_BYTES_PER_PIXEL
    assert cpu_runtime.train_temp_bytes(cfg, 2) == 16 * 128 ** 2 * cpu_runtime.TRAIN_TEMP_BYTES_PER_PIXEL
    assert cpu_runtime.train_temp_bytes(cfg, 3) == cpu_runtime.train_temp_bytes(cfg, 2)  # 3 does not divide 32: 2 devices
    odd = TrainConfig(model=ModelConfig(size=128), batch_size=7)
    assert cpu_runtime.train_temp_bytes(odd, 2) == 7 * 128 ** 2 * cpu_runtime.TRAIN_TEMP_BYTES_PER_PIXEL


def test_train_temp_bytes_is_close_to_xlas_own_count():
    """The per-pixel constant against XLA's memory analysis of a real (small) training step."""
    cfg = TrainConfig(model=ModelConfig(size=32, channels=1), batch_size=8, augment=False)
    state = jax.eval_shape(lambda: training_step.init_state(cfg, key=jax.random.key(0)))
    batch = jax.ShapeDtypeStruct((8, 32, 32, 1), np.uint8)
    compiled = jax.jit(training_step.train_step, static_argnames="config").lower(state, batch, cfg).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert 0.5 < temp / cpu_runtime.train_temp_bytes(cfg, 1) < 1.5, temp


def test_for_training_applies_only_to_large_steps_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_runtime, "reuse_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    large = TrainConfig(model=ModelConfig(size=128), batch_size=32)  # the MVTec AD preset: ~75 MiB per device
    small = TrainConfig(model=ModelConfig(size=64, channels=1), batch_size=16)  # the built-in textures': ~10 MiB
    assert cpu_runtime.for_training(small, 2) is False and not calls
    assert cpu_runtime.for_training(large, 2) is True and len(calls) == 1
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")  # an accelerator holds the step's buffers
    assert cpu_runtime.runs_on_cpu() is False
    assert cpu_runtime.for_training(large, 2) is False and len(calls) == 1


def _python(code: str, **env: str) -> str:
    full = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "PJRT_NPROC")}
    proc = subprocess.run([sys.executable, "-c", code], env=dict(full, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **env),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_cpu_devices_one_per_core_and_batch_divisor():
    """The scripts' default: one CPU device per core; an explicit count or XLA_FLAGS wins; the
    training mesh takes the most devices that divide the batch."""
    out = _python("import jax, json\n"
                  "from iepjax import cpu_runtime, sharding\n"
                  "n = cpu_runtime.use_cpu_cores(3)\n"
                  "sizes = [sharding.make_mesh(divides=b).size for b in (6, 4, 7)]\n"
                  "print(json.dumps([n, len(jax.devices()), sizes, cpu_runtime.use_cpu_cores()]))")
    assert json.loads(out) == [3, 3, [3, 2, 1], 3]  # after start-up the count in effect is kept
    out = _python("import jax\nfrom iepjax import cpu_runtime\nprint(cpu_runtime.use_cpu_cores(), len(jax.devices()))",
                  XLA_FLAGS="--xla_force_host_platform_device_count=4")
    assert out == "4 4"
    out = _python("import jax, os\nfrom iepjax import cpu_runtime\n"
                  "print(cpu_runtime.use_cpu_cores() == cpu_runtime.cpu_cores() == len(jax.devices()))")
    assert out == "True"


def test_the_library_and_the_pipelines_do_not_import_it():
    """CPU tuning is opt-in: importing the package, the pipelines or the CLI helpers loads no
    cpu_runtime (the scripts call it through `cli.start_runtime`)."""
    out = _python("import sys, iepjax, iepjax.cli, iepjax.pipelines\n"
                  "import iepjax.training, iepjax.localization, iepjax.thresholds, iepjax.distributed, iepjax.sharding\n"
                  "print(sorted(m for m in sys.modules if m == 'iepjax.cpu_runtime'))")
    assert out == "[]"


def test_long_projections_on_cpu_get_the_pjrt_nproc_advice(monkeypatch):
    monkeypatch.delenv("PJRT_NPROC", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert cpu_runtime.long_projection_advice(100, 2) is None  # the presets' length: no note
    note = cpu_runtime.long_projection_advice(cpu_runtime.LONG_PROJECTION_STEPS, 2)
    assert "PJRT_NPROC=3" in note
    monkeypatch.setenv("PJRT_NPROC", "3")  # already set: nothing to say
    assert cpu_runtime.long_projection_advice(5000, 2) is None
    monkeypatch.delenv("PJRT_NPROC")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")  # an accelerator: not XLA:CPU's thread pool
    assert cpu_runtime.long_projection_advice(5000, 2) is None
