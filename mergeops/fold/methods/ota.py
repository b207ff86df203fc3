"""ota: Optimization-Trajectory-Aware merging (Mahdavinia et al. 2025), SPEC §4.

Each checkpoint's Adam second moment v (``exp_avg_sq.safetensors``) weights its task vector per entry:
c = v^power, w = (c + ε)·mask·m_t, merged = θ0 + Σ w⊙τ / Σ w. Both sums are the state, so the merge
is exact in streaming form. ε is relative to each tensor's mean curvature. Fast Fisher Grafting
(``density``) keeps only the entries whose saliency v⊙τ² is among the top ``density`` share of the
whole checkpoint (threshold from two survey passes); dropped entries leave both sums. Where every
checkpoint dropped an entry, the base value is kept (``fallback = "base"``) or the plain mean of the
task vectors is used (``"mean"``). With ``rank1`` a 2-D v is replaced by the outer product of its row and column
sums over its total, computed for each piece of rows from the sums (so the fold still goes piece by piece).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from mergeops.errors import RejectedError
from mergeops.fold.methods.base import Arrival, MergeMethod, Param, Piece, Survey, between, in_unit_interval
from mergeops.fold.methods.parts import metric_weight
from mergeops.fold.topk import KthLargest
from mergeops.model import ModelFolder, StoredTensor, piece_bounds
from mergeops.model.folder import CURVATURE_FILE


def curvature_problem(base: ModelFolder, curvature: ModelFolder) -> str | None:
    """What is wrong with a checkpoint's curvature file: a floating tensor of the base it lacks or holds in another
    shape (an adapter's curvature is of the full tensors it updates, like a full checkpoint's)."""
    for name, info in base.tensors.items():
        found = curvature.tensors.get(name)
        if info.dtype.is_floating_point and (found is None or found.shape != info.shape):
            what = "lacks" if found is None else f"has shape {list(found.shape)} for"
            return (f"{curvature.path / CURVATURE_FILE} {what} tensor {name!r} (shape {list(info.shape)}); regenerate "
                    "it with `mergeops curvature import`.")
    return None


def _one_of(*choices: str):
    return lambda value: None if value in choices else f"must be one of {', '.join(map(repr, choices))}"


def curvature(v: torch.Tensor, power: float, rank1: bool) -> torch.Tensor:
    """c = v^power; with ``rank1`` a 2-D v is first replaced by its Adafactor-style rank-1 factorisation."""
    if rank1 and v.dim() == 2:
        total = v.sum()
        v = torch.outer(v.sum(1), v.sum(0)).div_(total) if total > 0 else torch.zeros_like(v)
    return v.pow(power)


def _sum(values: torch.Tensor) -> float:
    """Sum in float32 (torch sums pairwise, to ~1e-7: plenty for ε), in float64 only if float32 overflows."""
    total = float(values.sum())
    return total if math.isfinite(total) else float(values.sum(dtype=torch.float64))


@dataclass(frozen=True)
class _RankOne:
    """A 2-D v's rank-1 approximation outer(row sums, column sums) / total, made a block of rows at a time."""

    row_sums: torch.Tensor
    column_sums: torch.Tensor
    total: torch.Tensor

    def rows(self, start: int, stop: int) -> torch.Tensor:
        columns = self.column_sums.numel()
        if not self.total > 0:
            return torch.zeros((stop - start) // columns, columns)
        return torch.outer(self.row_sums[start // columns:stop // columns], self.column_sums).div_(self.total)


@dataclass(frozen=True)
class CurvaturePiece:
    """What OTA's fold of one piece needs: v (or its rank-1 approximation) there, and the tensor's ε."""

    v: torch.Tensor
    epsilon: float


@dataclass(frozen=True)
class _Curvature:
    """A tensor's curvature, checked, with its ε; cut into the fold's pieces."""

    v: StoredTensor
    epsilon: float
    rank_one: _RankOne | None

    def piece(self, start: int, stop: int) -> CurvaturePiece:
        v = self.rank_one.rows(start, stop).reshape(-1) if self.rank_one else self.v.read(start, stop).float()
        return CurvaturePiece(v, self.epsilon)


class OTA(MergeMethod):
    name = "ota"
    needs_curvature = True
    v: ModelFolder | None = None  # the checkpoint's exp_avg_sq.safetensors, open during a fold
    params = {
        "power": Param(0.5, float, between(0, 10), "c = v^power"),
        "epsilon": Param(1e-12, float, between(0, 1), "added to c, relative to the tensor's mean curvature"),
        "density": Param(None, float, in_unit_interval, "Fast Fisher Grafting: share of entries kept"),
        "rank1": Param(False, bool, help="use a rank-1 (row sums × column sums) approximation of 2-D v"),
        "fallback": Param("base", str, _one_of("base", "mean"), "where every checkpoint dropped an entry"),
        "metric": Param("none", str, _one_of("none", "loss", "step"), "per-checkpoint multiplier m_t from metrics"),
        "penalty": Param(1.0, float, between(0, 100), "exponent of the metric multiplier"),
    }

    def state_kinds(self) -> tuple[str, ...]:
        return ("weighted_sum", "weight_sum", *(("tau_sum",) if self.p["fallback"] == "mean" else ()))

    def metrics_needed(self) -> tuple[str, ...]:
        return () if self.p["metric"] == "none" else (self.p["metric"],)

    def begin(self, arrival: Arrival) -> None:
        """Open the checkpoint's curvature (the curvature gate checked it; checked again here, on the file that is read,
        in case it was replaced since)."""
        super().begin(arrival)
        self.v = ModelFolder.open(arrival.checkpoint.path, CURVATURE_FILE)
        problem = curvature_problem(arrival.checkpoint.base, self.v)
        if problem:
            raise RejectedError(problem, gate="curvature")
        metric = self.p["metric"]
        self.multiplier = 1.0 if metric == "none" else metric_weight(arrival.metrics, metric, self.p["penalty"])
        density = self.p["density"]
        self.saliency = KthLargest(lambda d: math.ceil(density * d)) if density is not None else None

    def _checked(self, name: str, v: torch.Tensor) -> torch.Tensor:
        """``v`` (all or part of tensor ``name``'s curvature) in float32, refused if negative or not finite."""
        v = v.float()
        lowest, highest = torch.aminmax(v) if v.numel() else (0.0, 0.0)  # one pass; a NaN makes both NaN
        if not (float(lowest) >= 0 and math.isfinite(float(highest))):
            raise RejectedError(f"{self.v.path / CURVATURE_FILE}: tensor {name!r} has negative or non-finite "
                                "second moments; regenerate it with `mergeops curvature import`.", gate="curvature")
        return v

    def _v(self, name: str) -> torch.Tensor:
        return self._checked(name, self.v.read(name))

    def _rank_one(self, v: torch.Tensor) -> _RankOne | None:
        return _RankOne(v.sum(1), v.sum(0), v.sum()) if self.p["rank1"] and v.dim() == 2 else None

    def prepare(self, name: str, base: StoredTensor, new: StoredTensor,
                state: Mapping[str, StoredTensor]) -> _Curvature:
        """The curvature, checked, and ε for this tensor (one pass over it, piece by piece unless ``rank1``)."""
        v = self.v.stored(name)
        power, rank_one = self.p["power"], None
        if self.p["rank1"]:
            whole = self._v(name)
            total = _sum(curvature(whole, power, rank1=True))
            rank_one = self._rank_one(whole)
        else:
            total = math.fsum(_sum(curvature(self._checked(name, v.read(start, stop)), power, rank1=False))
                              for start, stop in piece_bounds(v.shape))
        mean = total / v.numel if v.numel else 0.0
        return _Curvature(v, self.p["epsilon"] * (mean or 1.0), rank_one)  # ε relative to the mean curvature

    def survey(self) -> Survey | None:
        if self.saliency is None or self.saliency.done:
            return None
        if self.saliency.count:
            self.saliency.next_pass()
        return None if self.saliency.done else self._see

    def _see(self, name: str, base: torch.Tensor, new: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        v = self._v(name)
        rank_one = self._rank_one(v)
        if rank_one is not None:
            v = rank_one.rows(0, v.numel())
        self.saliency.feed(v * new.sub_(base).square())

    def fold(self, piece: Piece, base: torch.Tensor, new: torch.Tensor, state: dict[str, torch.Tensor],
             prepared: CurvaturePiece | None = None) -> dict[str, torch.Tensor]:
        tau = new.sub_(base)
        weight = prepared.v.pow(self.p["power"]).add_(prepared.epsilon)
        if self.multiplier != 1.0:
            weight.mul_(self.multiplier)
        if self.saliency is not None:
            weight.mul_(prepared.v * tau.square() >= self.saliency.value)
        if state:
            sums = {"weighted_sum": state["weighted_sum"].addcmul_(weight, tau),
                    "weight_sum": state["weight_sum"].add_(weight)}
        else:
            sums = {"weighted_sum": weight * tau, "weight_sum": weight}
        if self.p["fallback"] == "mean":
            sums["tau_sum"] = state["tau_sum"].add_(tau) if state else tau
        if not math.isfinite(float(sums["weighted_sum"].sum()) + float(sums["weight_sum"].sum())):
            raise RejectedError(f"OTA's weighted sums of tensor {piece.name!r} overflow float32 with this "
                                "checkpoint's curvature and metrics; lower the stream's `power` or `penalty`.",
                                gate="curvature")
        return sums

    def merged(self, piece: Piece, base: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = state["weight_sum"]
        # Both sums are finite (checked in fold) and weights are never negative, so the ratio is NaN (0/0) exactly
        # where every checkpoint excluded the entry.
        ratio = state["weighted_sum"] / weights
        if self.p["fallback"] == "mean":
            return torch.where(weights > 0, ratio, state["tau_sum"] / self.t).add_(base)
        # a quarter of the time of torch.where with a mask; infinities (overflow) stay what they are
        return ratio.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf).add_(base)

    def close(self) -> None:
        if self.v is not None:
            self.v.close()
