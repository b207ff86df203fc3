"""Torch's intra-op threads, where they hurt."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread: for many small operations (cache-sized pieces, d×d factorisations) intra-op
    threads gain nothing, and they slow down by 10-100× when a busy machine makes those threads wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def quick_gil_handoff(interval: float = 0.0002) -> Iterator[None]:
    """Let a thread waiting for the GIL get it within ``interval`` seconds instead of Python's 5 ms. Hashing
    threads need the GIL only for a moment between long GIL-free hash calls; while the main thread runs short
    torch operations, the default makes them wait up to 5 ms each time (a 243M-parameter fold: ~10% slower)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(interval)
    try:
        yield
    finally:
        sys.setswitchinterval(before)
