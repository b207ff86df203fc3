"""Threads in a fold: torch's intra-op threads where they hurt, quick GIL handoffs, work computed ahead."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


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


def map_ahead(function: Callable[[T], R], items: Sequence[T], workers: int, weight: Callable[[T], int],
              budget: int) -> Iterator[tuple[T, R]]:
    """``(item, function(item))`` for each item in order, computed ahead of the consumer on up to ``workers``
    threads at once (torch releases the GIL in its operations), up to ``2 * workers`` items ahead so that a slow
    item does not idle the other workers, while the items in flight weigh at most ``budget`` together (one item
    always may). The workers go on while the consumer handles a result, which no longer counts. Close the iterator
    when leaving early: queued items are cancelled and running ones finish."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mergeops-fold")
    pending: deque[tuple[T, Future[R]]] = deque()
    submitted, in_flight = 0, 0

    def submit_what_fits() -> None:
        nonlocal submitted, in_flight
        while submitted < len(items) and len(pending) < 2 * workers and (
                not pending or in_flight + weight(items[submitted]) <= budget):
            item = items[submitted]
            pending.append((item, pool.submit(function, item)))
            in_flight += weight(item)
            submitted += 1

    try:
        submit_what_fits()
        while pending:
            item, future = pending.popleft()
            result = future.result()
            in_flight -= weight(item)
            submit_what_fits()
            yield item, result
            del result  # not kept while the next one is awaited
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_aside(work: Callable[[], T], tick: Callable[[], None], every: float = 1.0) -> T:
    """``work()`` on a thread of its own while this thread calls ``tick()`` about every ``every`` seconds (to ping a
    watchdog; it may raise, to stop waiting). A blocking call cannot be interrupted, only no longer waited for: a
    thread given up on is a daemon thread, left to end on its own, and what it returns is dropped."""
    done: dict[str, Any] = {}

    def target() -> None:
        try:
            done["result"] = work()
        except BaseException as exc:  # handed to the waiting thread, raised there
            done["error"] = exc

    worker = threading.Thread(target=target, name="mergeops-aside", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(timeout=every)
        if worker.is_alive():
            tick()
    if "error" in done:
        raise done["error"]
    return done["result"]
