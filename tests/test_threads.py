"""Fold threads: computing ahead (results in order, bounded work in flight, errors, early exits) and GIL handoff."""

from __future__ import annotations

import threading
import time

import pytest

from mergeops.threads import map_ahead


class _Tracker:
    """Records how much weight is being computed at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = self.peak = 0
        self.started: list[int] = []

    def work(self, item: int) -> int:
        with self.lock:
            self.now += item
            self.peak = max(self.peak, self.now)
            self.started.append(item)
        time.sleep(0.02)
        with self.lock:
            self.now -= item
        return item * item


@pytest.mark.timeout(30)
def test_results_come_in_order_while_work_in_flight_stays_within_the_budget():
    tracker = _Tracker()
    items = [1, 1, 8, 1, 4, 4, 1, 1]
    results = list(map_ahead(tracker.work, items, workers=2, weight=lambda x: x, budget=8))
    assert results == [(x, x * x) for x in items]
    assert tracker.peak == 8  # 8 ran alone; 4 + 4 together


@pytest.mark.timeout(30)
def test_two_items_are_computed_at_once_when_they_fit():
    tracker = _Tracker()
    list(map_ahead(tracker.work, [1] * 6, workers=2, weight=lambda x: x, budget=2))
    assert tracker.peak == 2


@pytest.mark.timeout(30)
def test_the_workers_go_on_while_the_consumer_handles_a_result():
    started = [threading.Event() for _ in range(4)]

    def work(item: int) -> int:
        started[item].set()
        return item

    results = map_ahead(work, [0, 1, 2, 3], workers=2, weight=lambda x: 1, budget=2)
    assert next(results) == (0, 0)
    assert started[2].wait(10)  # two items are computed while the consumer holds the first
    assert list(results) == [(1, 1), (2, 2), (3, 3)]


@pytest.mark.timeout(30)
def test_a_slow_item_does_not_idle_the_other_worker():
    started = [threading.Event() for _ in range(4)]

    def work(item: int) -> bool:
        started[item].set()
        return started[3].wait(10) if item == 0 else True  # the first finishes only once the fourth has started

    results = list(map_ahead(work, [0, 1, 2, 3], workers=2, weight=lambda x: 1, budget=100))
    assert results == [(0, True), (1, True), (2, True), (3, True)]


@pytest.mark.timeout(30)
def test_an_error_reaches_the_consumer_at_its_item():
    def work(item: int) -> int:
        if item == 3:
            raise ValueError("bad item 3")
        return item

    seen = []
    with pytest.raises(ValueError, match="bad item 3"):
        for item, _ in map_ahead(work, [1, 2, 3, 4, 5], workers=2, weight=lambda x: 1, budget=2):
            seen.append(item)
    assert seen == [1, 2]


@pytest.mark.timeout(30)
def test_closing_early_computes_nothing_more():
    tracker = _Tracker()
    results = map_ahead(tracker.work, list(range(1, 20)), workers=2, weight=lambda x: 1, budget=2)
    assert next(results) == (1, 1)
    results.close()
    assert len(tracker.started) <= 3  # the first, plus at most the two computed ahead of it
    assert not [t for t in threading.enumerate() if t.name.startswith("mergeops-fold")]


def test_quick_gil_handoff_shortens_the_switch_interval_only_inside():
    import sys

    from mergeops.threads import quick_gil_handoff

    before = sys.getswitchinterval()
    with pytest.raises(RuntimeError), quick_gil_handoff(0.0003):
        assert sys.getswitchinterval() == pytest.approx(0.0003)
        raise RuntimeError("a fold fails")
    assert sys.getswitchinterval() == before
