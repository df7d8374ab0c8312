"""iepjax.hostmem: glibc's malloc keeps freed memory for reuse, and when training asks for it."""
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from iepjax import hostmem, training
from iepjax.config import ModelConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
GLIBC = hostmem.glibc() is not None

# A worker thread mallocs 96 MiB, writes it, frees it, and does it again; the page faults of the
# second round say whether the pages were kept (XLA:CPU's worker threads allocate and free each
# step's temporary buffer the same way; numpy is not used: it asks for huge pages).
_FAULTS = """
import ctypes, json, resource, sys, threading
from iepjax import hostmem
applied = hostmem.reuse_freed_memory() if sys.argv[1] == "reuse" else False
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
    assert hostmem.reuse_freed_memory() is False
    assert hostmem.heap_in_use() is None


def test_heap_in_use_counts_a_block_until_it_is_freed(libc):
    """An 8 MiB malloc adds 8 MiB (plus its header) to `heap_in_use`; its free takes them off again."""
    n = 8 * 2 ** 20
    before = hostmem.heap_in_use()
    p = libc.malloc(n)
    held = hostmem.heap_in_use() - before
    libc.free(p)
    after = hostmem.heap_in_use() - before
    assert n <= held < n + 2 ** 20, held  # other threads may allocate meanwhile: 1 MiB of slack
    assert abs(after) < 2 ** 20, after


def test_train_temp_bytes_splits_the_batch_as_the_mesh_does():
    cfg = TrainConfig(model=ModelConfig(size=128), batch_size=32)
    assert hostmem.train_temp_bytes(cfg, 1) == 32 * 128 ** 2 * hostmem.TRAIN_TEMP_BYTES_PER_PIXEL
    assert hostmem.train_temp_bytes(cfg, 2) == 16 * 128 ** 2 * hostmem.TRAIN_TEMP_BYTES_PER_PIXEL
    assert hostmem.train_temp_bytes(cfg, 3) == hostmem.train_temp_bytes(cfg, 2)  # 3 does not divide 32: 2 devices
    odd = TrainConfig(model=ModelConfig(size=128), batch_size=7)
    assert hostmem.train_temp_bytes(odd, 2) == 7 * 128 ** 2 * hostmem.TRAIN_TEMP_BYTES_PER_PIXEL


def test_train_temp_bytes_is_close_to_xlas_own_count():
    """The per-pixel constant against XLA's memory analysis of a real (small) training step."""
    cfg = TrainConfig(model=ModelConfig(size=32, channels=1), batch_size=8, augment=False)
    state = jax.eval_shape(lambda: training.init_state(cfg, key=jax.random.key(0)))
    batch = jax.ShapeDtypeStruct((8, 32, 32, 1), np.uint8)
    compiled = jax.jit(training.train_step, static_argnames="config").lower(state, batch, cfg).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert 0.5 < temp / hostmem.train_temp_bytes(cfg, 1) < 1.5, temp


def test_for_training_applies_only_to_large_steps_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(hostmem, "reuse_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    large = TrainConfig(model=ModelConfig(size=128), batch_size=32)  # the MVTec AD preset: ~75 MiB per device
    small = TrainConfig(model=ModelConfig(size=64, channels=1), batch_size=16)  # the built-in textures': ~10 MiB
    assert hostmem.for_training(small, 2) is False and not calls
    assert hostmem.for_training(large, 2) is True and len(calls) == 1
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")  # an accelerator holds the step's buffers
    assert hostmem.runs_on_cpu() is False
    assert hostmem.for_training(large, 2) is False and len(calls) == 1
