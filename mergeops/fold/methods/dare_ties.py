"""dare_ties: continual TIES (see ``ties.py``) with DARE in place of trimming.

m is the merged task vector, stored scaled (merged model = θ0 + m). First checkpoint: m = λ·DARE(τ_1). Then
m ← m + λ·(the entries of m and DARE(τ_t) whose sign agrees with the sign of their sum). The running merge m is
never sparsified again: dropping entries of m that are already zero would make the merge collapse over time.
"""

from __future__ import annotations

import torch

from mergeops.fold.methods.base import SCALE, Param, Piece, elementwise, in_unit_interval
from mergeops.fold.methods.parts import agreeing_sum, drop_and_rescale


def fold(base: torch.Tensor, new: torch.Tensor, merged_tau: torch.Tensor | None, *, t: int, piece: Piece,
         lambda_: float = Param(0.3, check=SCALE, help="scaling of each step's merged update"),
         density: float = Param(0.5, check=in_unit_interval, help="share of each task vector's entries kept"),
         seed: int = Param(0, help="seed of the random drop (with the checkpoint's position and the entry's)"),
         ) -> torch.Tensor:
    tau = drop_and_rescale(new.sub_(base), density, seed, t, piece)
    if merged_tau is None:
        return tau.mul_(lambda_)
    return merged_tau.add_(agreeing_sum(merged_tau, tau), alpha=lambda_)


def merged(base: torch.Tensor, merged_tau: torch.Tensor) -> torch.Tensor:
    return base + merged_tau


DareTies = elementwise("dare_ties", fold, merged)
