"""ties: continual TIES merging as in FusionBench (``fusion_bench/method/opcm/ties_merging.py``).

State: m, the merged task vector, stored scaled (merged model = θ0 + m). First checkpoint: m = λ·τ_1,
untrimmed. Then: trim m and τ_t each to their largest magnitudes over the whole model (the
int(density·d) + 1 largest, ties at the threshold kept, as FusionBench's ``topk_values_mask``), elect
the sign of the trimmed sum, sum the trimmed entries that agree with it, and m ← m + λ·that sum.
The model-wide thresholds come from two survey passes (exact radix select), not from loading the model.
"""

from __future__ import annotations

from typing import Any

import torch

from mergeops.fold.methods.base import SCALE, Arrival, MergeMethod, Param, Piece, Survey, in_unit_interval
from mergeops.fold.methods.parts import agreeing_sum, trim
from mergeops.fold.topk import KthLargest


class Ties(MergeMethod):
    name = "ties"
    params = {
        "lambda": Param(0.3, float, SCALE, help="scaling of each step's merged update"),
        "density": Param(0.2, float, in_unit_interval, "share of entries kept by magnitude, model-wide"),
    }

    def state_kinds(self) -> tuple[str, ...]:
        return ("merged_tau",)

    def begin(self, arrival: Arrival) -> None:
        super().begin(arrival)
        density = self.p["density"]
        self.thresholds = [KthLargest(lambda d: int(density * d) + 1) for _ in range(2)]  # for m, for τ

    def survey(self) -> Survey | None:
        if self.t == 1 or self.thresholds[0].done:
            return None
        if self.thresholds[0].count:  # a pass has just finished
            for selector in self.thresholds:
                selector.next_pass()
        return None if self.thresholds[0].done else self._see

    def _see(self, name: str, base: torch.Tensor, new: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        self.thresholds[0].feed(state["merged_tau"].abs())
        self.thresholds[1].feed(new.sub_(base).abs_())

    def fold(self, piece: Piece, base: torch.Tensor, new: torch.Tensor, state: dict[str, torch.Tensor],
             prepared: Any = None) -> dict[str, torch.Tensor]:
        tau = new.sub_(base)
        if not state:
            return {"merged_tau": tau.mul_(self.p["lambda"])}
        m = state["merged_tau"]
        m_threshold, tau_threshold = (s.value for s in self.thresholds)
        update = agreeing_sum(trim(m, m_threshold), trim(tau, tau_threshold))
        return {"merged_tau": m.add_(update, alpha=self.p["lambda"])}

    def merged(self, piece: Piece, base: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return base + state["merged_tau"]
