"""task_arithmetic: θ0 + λ Σ τ_t, keeping the plain sum of task vectors as state."""

from __future__ import annotations

import torch

from mergeops.fold.methods.base import SCALE, MergeMethod, Param


class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    elementwise = True
    params = {"lambda": Param(0.3, float, SCALE, help="scaling of the summed task vectors")}

    def state_kinds(self) -> tuple[str, ...]:
        return ("sum",)

    def fold(self, name: str, base: torch.Tensor, new: torch.Tensor,
             state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tau = new.sub_(base)
        return {"sum": state["sum"].add_(tau) if state else tau}

    def merged(self, name: str, base: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.add(base, state["sum"], alpha=self.p["lambda"])
