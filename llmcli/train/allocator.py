"""Keep freed memory in the process for CPU training (glibc only).

glibc hands every allocation above 32 MB straight to the OS (`mmap`) and returns it on free, so
each training step gets its big tensors (the gradients, the output layer's logits and its
gradient, activations) as fresh pages: at the scifi shapes that is ~1 GB of page faults per
step, ~0.35 ms per MB on these machines, and 10 % of a bf16 step. With `mmap` off and the trim
threshold high, freed blocks stay in the heap and the next step reuses them: measured 2.0 ->
1.8 s per bf16 step and 3.6 -> 3.45 s per fp32 step (benchmarks/bench_train.py). The cost is
that the process keeps its peak memory until it exits, which a training run does anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_MAX = -4


@functools.cache
def keep_freed_memory() -> bool:
    """Switch glibc's malloc to reuse freed large blocks; False where that is not possible."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
