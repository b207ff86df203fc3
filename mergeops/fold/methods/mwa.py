"""mwa: Metrics-Weighted Averaging (Yu & Choi 2025), SPEC §4.

w_t ∝ g_t^penalty with g = 1/loss or g = step; the running weighted mean is exact:
W_t = W_{t−1} + w_t, θ̄_t = θ̄_{t−1} + (w_t/W_t)(θ_t − θ̄_{t−1}). With ``window = k`` only the last k
checkpoints count: the expired one is re-read by digest and its contribution removed; if it is gone
(or changed), the mean is rebuilt from the window's checkpoints that remain.
"""

from __future__ import annotations

from typing import Any

import torch

from mergeops.errors import ModelFolderError
from mergeops.fold.methods.base import Arrival, MergeMethod, Param, Piece, between
from mergeops.fold.methods.parts import metric_weight
from mergeops.model import folder_digest
from mergeops.model.finetune import FineTune


def _metric_name(value: str) -> str | None:
    return None if value in ("loss", "step") else "must be \"loss\" or \"step\""


class MWA(MergeMethod):
    name = "mwa"
    params = {
        "metric": Param("loss", str, _metric_name, "weight by 1/loss or by training step"),
        "penalty": Param(1.0, float, between(0, 100), "exponent of the metric; 0 is the plain average"),
        "window": Param(0, int, lambda k: None if k >= 0 else "must be at least 0",
                        "merge only the last k checkpoints (0: all)"),
    }
    expired: FineTune | None = None  # the checkpoint leaving the window, re-read to remove it
    rebuild: list[tuple[FineTune, float]] | None = None  # the window's checkpoints, when the expired one is gone

    def state_kinds(self) -> tuple[str, ...]:
        return ("mean",)

    def metrics_needed(self) -> tuple[str, ...]:
        return (self.p["metric"],)

    def begin(self, arrival: Arrival) -> None:
        super().begin(arrival)
        self.expired, self.expired_weight, self.rebuild = None, 0.0, None
        self.weight = metric_weight(arrival.metrics, self.p["metric"], self.p["penalty"])
        members: list[list] = [*self.scalars.get("window", []), [arrival.digest, self.weight]]
        self.total = float(self.scalars.get("total_weight", 0.0)) + self.weight
        k = self.p["window"]
        if k and len(members) > k:
            (digest, weight), members = members[0], members[1:]
            folder = _open_verified(arrival, digest)
            if folder is not None:
                self.expired, self.expired_weight = folder, weight
                self.total -= weight
            else:
                self.rebuild, members = self._reopen_window(arrival, members[:-1])
                self.notes.append(f"checkpoint {digest} left the window but cannot be re-read; the mean was "
                                  f"rebuilt from the {len(members)} checkpoint(s) of the window that remain")
                self.total = sum(w for _, w in self.rebuild) + self.weight
        self.members = members

    def _reopen_window(self, arrival: Arrival, members: list[list]) -> tuple[list[tuple[FineTune, float]], list]:
        readable, kept = [], []
        for digest, weight in members:
            folder = _open_verified(arrival, digest)
            if folder is None:
                self.notes.append(f"checkpoint {digest} of the window cannot be re-read; it is left out")
                continue
            readable.append((folder, weight))
            kept.append([digest, weight])
        return readable, [*kept, [arrival.digest, self.weight]]

    def fold(self, piece: Piece, base: torch.Tensor, new: torch.Tensor, state: dict[str, torch.Tensor],
             prepared: Any = None) -> dict[str, torch.Tensor]:
        if not state:
            return {"mean": new}
        if self.rebuild is not None:
            mean = new.mul_(self.weight)
            for folder, weight in self.rebuild:
                mean.add_(_read(folder, piece), alpha=weight)
            return {"mean": mean.div_(self.total)}
        mean = state["mean"]
        with_new = self.total + self.expired_weight
        mean.add_(new.sub_(mean), alpha=self.weight / with_new)
        if self.expired is not None:
            # remove the expired checkpoint: θ̄ = (W θ̄ − w_e θ_e) / (W − w_e)
            mean.mul_(with_new).sub_(_read(self.expired, piece), alpha=self.expired_weight).div_(self.total)
        return {"mean": mean}

    def finish(self) -> None:
        super().finish()
        self.scalars["total_weight"] = self.total
        self.scalars["window"] = self.members if self.p["window"] else []

    def merged(self, piece: Piece, base: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return state["mean"]

    def close(self) -> None:
        for folder in [self.expired, *(f for f, _ in self.rebuild or [])]:
            if folder is not None:
                folder.close()


def _read(checkpoint: FineTune, piece: Piece) -> torch.Tensor:
    """A piece of an earlier checkpoint, read as it was when it was folded."""
    return checkpoint.read(piece.name, piece.start, piece.stop).float()


def _open_verified(arrival: Arrival, digest: str) -> FineTune | None:
    """The past checkpoint with this digest, if it is still on disk unchanged."""
    past = next((p for p in arrival.history if p.digest == digest), None)
    if past is None or arrival.reopen is None or not past.path.is_dir():
        return None
    try:
        if folder_digest(past.path) != digest:
            return None
        return arrival.reopen(past.path)
    except ModelFolderError:
        return None
