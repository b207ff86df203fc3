"""task_arithmetic: θ0 + λ Σ τ_t, keeping the plain sum of task vectors as state."""

from __future__ import annotations

import torch

from mergeops.fold.methods.base import SCALE, Param, elementwise
from mergeops.fold.methods.parts import add


def fold(base: torch.Tensor, new: torch.Tensor, sum: torch.Tensor | None) -> torch.Tensor:
    tau = new.sub_(base)
    return tau if sum is None else add(sum, tau)


def merged(base: torch.Tensor, sum: torch.Tensor, *,
           lambda_: float = Param(0.3, check=SCALE, help="scaling of the summed task vectors")) -> torch.Tensor:
    return torch.add(base, sum, alpha=lambda_)


TaskArithmetic = elementwise("task_arithmetic", fold, merged)
