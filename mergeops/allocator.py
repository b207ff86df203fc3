"""Process-wide memory allocator tuning for the `mergeops` command (never applied on import).

glibc serves allocations above its mmap threshold (128 KiB to 32 MiB, adjusted as it goes) with fresh
mappings and unmaps them on free, so every tensor-sized buffer of a fold page-faults anew. Raising the
threshold lets freed tensor memory be reused from the heap: elementwise folds run about twice as fast
(measured in benchmarks/RESULTS.md). The heap keeps its high-water mark, which a fold bounds to a few
tensors, so peak memory is unchanged; it is only kept until the process exits.

Threads share that one heap (one arena): with an arena per thread, each would keep its own high-water mark,
and OPCM's fold, which factorises two tensors at once on two threads, peaked ~25% higher (benchmarks/RESULTS.md);
its threads allocate a few large buffers per tensor, so they hardly ever wait for each other's malloc.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds and keep one arena; returns whether it applied (Linux with glibc
    only). Call it before any thread allocates."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(option, value) for option, value in
               ((_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, 1 << 31), (_M_ARENA_MAX, 1)))
