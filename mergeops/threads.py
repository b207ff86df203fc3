"""Threads: torch's intra-op threads where they hurt, and a worker that computes ahead."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

import torch

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


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


class Lookahead(Generic[K, V]):
    """``compute(key)`` for ``keys`` in order on a worker thread, at most ``ahead`` results computed before
    they are taken, so the caller's work on one key overlaps the computation for the next.

    >>> with Lookahead(names, factorise) as ahead:
    ...     for name in names:
    ...         use(ahead.take(name))

    A key taken out of order (or not announced) is computed on the caller's thread.
    """

    def __init__(self, keys: Iterable[K], compute: Callable[[K], V], ahead: int = 2) -> None:
        self._keys, self._compute = list(keys), compute
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeops-lookahead")
        self._started: dict[K, Future[V]] = {}
        self._next = 0
        for _ in range(ahead):
            self._start_next()

    def _start_next(self) -> None:
        if self._next < len(self._keys):
            key = self._keys[self._next]
            self._next += 1
            self._started[key] = self._pool.submit(self._compute, key)

    def take(self, key: K) -> V:
        started = self._started.pop(key, None)
        if started is None:
            return self._compute(key)
        self._start_next()
        return started.result()

    def close(self) -> None:
        for started in self._started.values():
            started.cancel()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Lookahead[K, V]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
