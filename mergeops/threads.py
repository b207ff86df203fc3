"""Torch's intra-op threads, where they hurt."""

from __future__ import annotations

import contextlib
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
