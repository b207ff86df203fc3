"""magmax: θ0 + λ·τ_max, where τ_max keeps, per entry, the task vector of largest magnitude so far."""

from __future__ import annotations

import torch

from mergeops.fold.methods.base import SCALE, Param, elementwise
from mergeops.fold.methods.parts import max_magnitude


def fold(base: torch.Tensor, new: torch.Tensor, tau_max: torch.Tensor | None) -> torch.Tensor:
    tau = new.sub_(base)
    return tau if tau_max is None else max_magnitude(tau_max, tau)


def merged(base: torch.Tensor, tau_max: torch.Tensor, *,
           lambda_: float = Param(0.5, check=SCALE, help="scaling of the max-magnitude task vector")) -> torch.Tensor:
    return torch.add(base, tau_max, alpha=lambda_)


MagMax = elementwise("magmax", fold, merged)
