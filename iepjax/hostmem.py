"""The host-memory functions under their former module name; they live in `iepjax.cpu_runtime`.

Kept only while the benchmark scripts import `iepjax.hostmem`; nothing in the package imports it.
"""
from iepjax.cpu_runtime import (  # noqa: F401 (re-exported)
    MMAP_ALWAYS_BYTES, TRAIN_TEMP_BYTES_PER_PIXEL, for_training, glibc, heap_in_use, reuse_freed_memory, runs_on_cpu,
    train_temp_bytes)
