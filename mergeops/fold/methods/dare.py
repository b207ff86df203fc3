"""dare: task arithmetic over DARE-sparsified task vectors, θ0 + λ Σ DARE(τ_t).

DARE (Yu et al. 2024, "Language Models are Super Mario") keeps each entry of τ_t with probability ``density`` and
rescales the kept ones by 1/density. Only the new task vector is dropped, never the running sum: re-dropping the
sum would hit entries that are already zero and let the merge collapse. State: Σ DARE(τ).
"""

from __future__ import annotations

import torch

from mergeops.fold.methods.base import SCALE, Param, Piece, elementwise, in_unit_interval
from mergeops.fold.methods.parts import add, drop_and_rescale


def fold(base: torch.Tensor, new: torch.Tensor, sum: torch.Tensor | None, *, t: int, piece: Piece,
         density: float = Param(0.5, check=in_unit_interval, help="share of each task vector's entries kept"),
         seed: int = Param(0, help="seed of the random drop (with the checkpoint's position and the entry's)"),
         ) -> torch.Tensor:
    tau = drop_and_rescale(new.sub_(base), density, seed, t, piece)
    return tau if sum is None else add(sum, tau)


def merged(base: torch.Tensor, sum: torch.Tensor, *,
           lambda_: float = Param(0.3, check=SCALE, help="scaling of the summed task vectors")) -> torch.Tensor:
    return torch.add(base, sum, alpha=lambda_)


Dare = elementwise("dare", fold, merged)
