"""average: the running mean of the checkpoints, θ̄_t = θ̄_{t−1} + (θ_t − θ̄_{t−1})/t."""

from __future__ import annotations

import torch

from mergeops.fold.methods.base import elementwise


def fold(base: torch.Tensor, new: torch.Tensor, mean: torch.Tensor | None, *, t: int) -> torch.Tensor:
    return new if mean is None else mean.add_(new.sub_(mean), alpha=1.0 / t)


def merged(base: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return mean


Average = elementwise("average", fold, merged)
