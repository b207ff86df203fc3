#!/usr/bin/env python
"""Where a factored OPCM sum stops being cheaper than a dense one (``opcm.max_factored_rank``).

    PYTHONPATH=. python benchmarks/opcm/threshold_lowrank.py

Per tensor shape of the 243M Llama-shaped model, on one torch thread as the fold runs a projection: the dense step
(Gram-matrix SVD of S, the projection, S + D, the merged values) against the factored step at rank k (QR of the
factors, SVD of the core, recompression with a rank-16 update, and the merged values θ0 + scale·L R). Best of a few.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from mergeops.fold.methods.opcm import OPCM, update_removal
from mergeops.model import InMemory

SHAPES = [(1024, 1024), (256, 1024), (2816, 1024), (1024, 2816)]
RANKS = [16, 32, 64, 128, 192, 256, 384, 512]
UPDATE_RANK = 16


def best_time(step: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(opcm: OPCM, rows: int, columns: int, generator: torch.Generator) -> list[str]:
    """The dense step's time and the factored step's at each rank, for one tensor shape."""
    s, tau = torch.randn(rows, columns, generator=generator), torch.randn(rows, columns, generator=generator)

    def dense_step() -> object:
        removal = update_removal(InMemory(s), InMemory(tau), (rows, columns), 0.5, True)
        return torch.add(s, tau - removal.read().reshape(rows, columns), alpha=0.5)

    cells = [f"{rows}×{columns}: dense {best_time(dense_step, 2):.3f} s"]
    for rank in (k for k in RANKS if k < min(rows, columns)):
        state = {"sum.left": InMemory(torch.randn(rows, rank - UPDATE_RANK, generator=generator)),
                 "sum.right": InMemory(torch.randn(rank - UPDATE_RANK, columns, generator=generator))}
        update = (torch.randn(rows, UPDATE_RANK, generator=generator),
                  torch.randn(UPDATE_RANK, columns, generator=generator))

        def factored_step(state: dict = state, update: tuple = update, rank: int = rank) -> object:
            new = opcm._factored_sum(state, update, rank)
            return torch.addmm(s, new.left, new.right, alpha=0.5)

        cells.append(f"k={rank} {best_time(factored_step):.3f} s")
    return cells


def main() -> None:
    torch.set_num_threads(1)
    opcm = OPCM(OPCM.check_params({"alpha": 0.5, "zero_diagonal": True}, "threshold"))
    generator = torch.Generator().manual_seed(0)
    for rows, columns in SHAPES:
        print(" | ".join(measure(opcm, rows, columns, generator)), flush=True)


if __name__ == "__main__":
    main()
