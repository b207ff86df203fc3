"""The look-ahead worker and the one-thread setting."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from mergeops.threads import Lookahead, one_torch_thread


def test_lookahead_computes_in_order_on_a_worker_at_most_ahead_results_early():
    computed: list[tuple[int, str]] = []
    caller = threading.get_ident()

    def compute(key: int) -> int:
        computed.append((key, "worker" if threading.get_ident() != caller else "caller"))
        return key * key

    with Lookahead(range(6), compute, ahead=2) as ahead:
        time.sleep(0.1)
        assert [k for k, _ in computed] == [0, 1]  # no further than ``ahead``
        assert [ahead.take(k) for k in range(6)] == [0, 1, 4, 9, 16, 25]
    assert [k for k, _ in computed] == list(range(6))
    assert {where for _, where in computed} == {"worker"}


def test_lookahead_computes_an_unannounced_key_on_the_caller_and_passes_errors_on():
    def compute(key: int) -> int:
        if key == 2:
            raise ValueError("bad key")
        return key

    with Lookahead([1, 2], compute) as ahead:
        assert ahead.take(7) == 7
        assert ahead.take(1) == 1
        with pytest.raises(ValueError, match="bad key"):
            ahead.take(2)


def test_one_torch_thread_restores_the_setting():
    before = torch.get_num_threads()
    with one_torch_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
