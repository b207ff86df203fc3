"""magmax: θ0 + λ·τ_max, where τ_max keeps, per entry, the task vector of largest magnitude so far."""

from __future__ import annotations

import torch

from mergeops.fold.methods.base import SCALE, MergeMethod, Param


class MagMax(MergeMethod):
    name = "magmax"
    elementwise = True
    params = {"lambda": Param(0.5, float, SCALE, help="scaling of the max-magnitude task vector")}

    def state_kinds(self) -> tuple[str, ...]:
        return ("tau_max",)

    def fold(self, name: str, base: torch.Tensor, new: torch.Tensor,
             state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tau = new.sub_(base)
        if not state:
            return {"tau_max": tau}
        kept = state["tau_max"]
        return {"tau_max": torch.where(tau.abs() > kept.abs(), tau, kept)}  # ties keep the earlier one

    def merged(self, name: str, base: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.add(base, state["tau_max"], alpha=self.p["lambda"])
