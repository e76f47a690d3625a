"""Host memory that a CPU training or inference process keeps for reuse instead of handing back.

Why: glibc's malloc serves every request above its mmap threshold (at most 32 MiB by default)
with a fresh mmap and unmaps it on free. A CPU training step at real widths allocates such blocks
by the hundred (each NF4 weight dequantised three times a step: 38-201 MB for Phi-3-mini's
layers in fp32; activations of long rows), and the kernel zero-fills every page of every one on
first touch. Measured at Phi-3-mini widths, 2 layers, one row, 2 threads (bench/throughput.py
--layers 2, phicore-qlora; `bench/results/cpu-2026-11-26-phi-3-mini-4k-l2-*`): a step of 128
tokens 2.93 s -> 1.78 s, of 512 tokens 6.71 s -> 4.85 s; peak resident memory 1.41 -> 1.59 GB
and 1.81 -> 2.09 GB.

`keep_freed_host_memory()` raises the mmap threshold and the trim threshold (glibc `mallopt`), so
large blocks come from the heap and stay there once freed: the next step's blocks of the same
sizes are already resident. The cost: the process's resident size stays at its high-water mark
instead of shrinking between steps, which a training run reaches every step anyway. Linux with
glibc only (other platforms' allocators decide for themselves); train.py (unless
--no-keep-host-memory) and infer.py call it for CPU runs once the model is built, so the load's
temporaries (dense weights on their way to NF4) still go back to the system. It changes how
memory is obtained, not any number computed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
# mallopt takes a C int. Older 64-bit glibc refuses an mmap threshold above 32 MiB (HEAP_MAX_SIZE
# / 2); newer ones take up to the int's limit. Tried from the largest down.
_MMAP_THRESHOLDS = (2**31 - 1, 1 << 25)
_TRIM_THRESHOLD = 2**31 - 1

_applied = False


def keep_freed_host_memory() -> bool:
    """Have glibc keep freed large blocks for reuse (module docstring); True when it took effect.
    Idempotent, process-wide; a no-op (False) off Linux/glibc."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD):
        return False
    _applied = any(mallopt(_M_MMAP_THRESHOLD, value) for value in _MMAP_THRESHOLDS)
    return _applied
