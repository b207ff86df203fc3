"""Process-wide memory allocator tuning for the `mergeops` command (never applied on import).

glibc serves allocations above its mmap threshold (128 KiB to 32 MiB, adjusted as it goes) with fresh
mappings and unmaps them on free, so every tensor-sized buffer of a fold page-faults anew. Raising the
threshold lets freed tensor memory be reused from the heap: elementwise folds run about twice as fast
(measured in benchmarks/RESULTS.md). The heap keeps its high-water mark, which a fold bounds to a few
tensors, so peak memory is unchanged; it is only kept until the process exits.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds; returns whether it applied (Linux with glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31))
