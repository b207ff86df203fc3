"""average: the running mean of the checkpoints, θ̄_t = θ̄_{t−1} + (θ_t − θ̄_{t−1})/t."""

from __future__ import annotations

import torch

from mergeops.fold.methods.base import MergeMethod


class Average(MergeMethod):
    name = "average"
    elementwise = True

    def state_kinds(self) -> tuple[str, ...]:
        return ("mean",)

    def fold(self, name: str, base: torch.Tensor, new: torch.Tensor,
             state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not state:
            return {"mean": new}
        mean = state["mean"]
        return {"mean": mean.add_(new.sub_(mean), alpha=1.0 / self.t)}

    def merged(self, name: str, base: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return state["mean"]
