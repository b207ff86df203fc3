"""opcm: Orthogonal-Projection Continual Merging (Tang et al. 2025), SPEC §4.

State: the unnormalised sum S of projected updates, and the norms of every task vector. For a
projected tensor, the part of the new task vector lying in both the top-r left and top-r right
singular subspaces of S is removed, so later tasks do not overwrite what earlier ones established.
The merged model is θ0 + n̄_t · S/‖S‖ with n̄_t the mean task-vector norm (a model-wide quantity,
hence ``merged_after_finish``).

How a projection streams. Let A be S if S has at least as many rows as columns, else Sᵀ. The eigendecomposition
of AᵀA (float64, summed over blocks of A's rows) gives S's singular values and its small singular factor; the
large one is A V Σ⁻¹, computed a block of rows at a time. A tall S is never read whole: it is read in blocks of
rows, twice, and the projection holds its left singular factor U (S's size) and n×n matrices. The coefficients
U_rᵀ τ V_r and u_iᵀ τ v_i come from one more pass over τ's rows, and the fold removes U C Vᵀ a block of rows at
a time. A wide S (a few rows of many columns, like a down projection) is read whole and transposed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from mergeops.fold.methods.base import Arrival, MergeMethod, Param, Piece, Prepared
from mergeops.model import InMemory, Pieces, StoredTensor, piece_bounds
from mergeops.model.architectures import is_embedding

# σ_i² / σ_1² at or below which S's i-th singular direction is below float32's resolution of S: its left singular
# vector is arbitrary (in any SVD of S), so it is neither protected nor has its diagonal coefficient removed.
_GRAM_FLOOR = 1e-14


def _regex_list(value: list) -> str | None:
    try:
        for pattern in value:
            re.compile(pattern)
    except (re.error, TypeError) as exc:
        return f"must be a list of regular expressions ({exc})"
    return None


def _alpha_range(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be between 0 and 1"


def projection_rank(singular_values: torch.Tensor, alpha: float) -> int:
    """r = how many leading singular values have cumulative share of Σσ at most α."""
    total = float(singular_values.sum(dtype=torch.float64))
    if total == 0.0:
        return 0
    share = torch.cumsum(singular_values.double(), 0) / total
    return int((share <= alpha).sum())


def sum_of_squares(piece: torch.Tensor) -> float:
    """Σ x² in float64 (the engine hands ``fold`` pieces, so the float64 temporary is a piece's)."""
    return float(piece.square().sum(dtype=torch.float64))


@dataclass(frozen=True)
class _Difference:
    """τ = new − base in float32 whatever the stored dtype (SPEC §4), read piece by piece."""

    new: Pieces
    base: Pieces

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        new, base = self.new.read(start, stop), self.base.read(start, stop)
        return new.to(torch.float32, copy=True).sub_(base.to(torch.float32))


@dataclass(frozen=True)
class _Product:
    """left @ right, read piece by piece: a piece of whole rows needs only those rows of ``left``."""

    left: torch.Tensor
    right: torch.Tensor

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if not start and stop is None:
            return self.left @ self.right
        columns = self.right.shape[1]
        if start % columns or (stop is not None and stop % columns):
            raise ValueError(f"elements [{start}, {stop}) are not whole rows of {columns} elements")
        rows = slice(start // columns, None if stop is None else stop // columns)
        return (self.left[rows] @ self.right).reshape(-1)

    def piece(self, start: int, stop: int) -> torch.Tensor:
        return self.read(start, stop)


def _removed_coefficients_times(k: torch.Tensor, r: int, zero_diagonal: bool, x_t: torch.Tensor) -> torch.Tensor:
    """C Xᵀ, where C keeps of the coefficients K the top-r block and, with ``zero_diagonal``, the diagonal."""
    product = k.diagonal()[:, None] * x_t if zero_diagonal else torch.zeros_like(x_t)
    product[:r] = k[:r, :r] @ x_t[:r]
    return product


def update_removal(accumulated: Pieces, update: Pieces, shape: tuple[int, int], alpha: float,
                   zero_diagonal: bool) -> _Product | None:
    """What OPCM removes from the update τ of a projected tensor of ``shape`` given its accumulated S (SPEC §4:
    D = τ − removal), to read piece by piece; None if nothing (S is zero, or r = 0 without ``zero_diagonal``)."""
    rows, columns = shape
    if not rows or not columns:
        return None
    tall = rows >= columns
    if tall:  # S is read a block of rows at a time, never whole
        a_blocks = list(piece_bounds(shape))

        def a_block(start: int, stop: int) -> torch.Tensor:
            return accumulated.read(start, stop).reshape(-1, columns)
    else:
        a = accumulated.read().reshape(shape).T
        a_blocks = list(piece_bounds((columns, rows)))

        def a_block(start: int, stop: int) -> torch.Tensor:
            return a[start // rows:stop // rows]
    small = min(shape)
    gram = torch.zeros(small, small, dtype=torch.float64)
    for start, stop in a_blocks:
        values = a_block(start, stop)
        dtype = values.dtype  # float32 in a fold; float64 when a probe asks for it
        values = values.double()
        gram.addmm_(values.T, values)
    eigenvalues, vectors = torch.linalg.eigh(gram)
    eigenvalues, vectors = eigenvalues.flip(0), vectors.flip(1)  # descending, as singular values are
    if not bool(eigenvalues[0] > 0):
        return None  # nothing merged in this tensor yet: no subspace to protect
    resolved = eigenvalues > _GRAM_FLOOR * eigenvalues[0]  # a leading run of them
    r = min(projection_rank(eigenvalues.clamp(min=0).sqrt(), alpha), int(resolved.sum()))
    if r == 0 and not zero_diagonal:
        return None
    inverse = torch.where(resolved, eigenvalues.clamp(min=torch.finfo(torch.float64).tiny).rsqrt(), 0.0)  # 1/σ_i
    large = torch.empty(max(shape), small, dtype=dtype)  # A V Σ⁻¹: U if S is tall, V if it is wide
    for start, stop in a_blocks:
        large[start // small:stop // small] = (a_block(start, stop).double() @ vectors).mul_(inverse)
    vectors = vectors.to(dtype)
    tau_blocks = piece_bounds(shape)
    if tall:  # K = Uᵀ τ V, with Uᵀ τ summed over blocks of rows
        left_t_tau = torch.zeros(small, columns, dtype=dtype)
        for start, stop in tau_blocks:
            left_t_tau.addmm_(large[start // columns:stop // columns].T, update.read(start, stop).reshape(-1, columns))
        k = left_t_tau @ vectors
        return _Product(large, _removed_coefficients_times(k, r, zero_diagonal, vectors.T))
    tau_v = torch.empty(rows, small, dtype=dtype)  # K = Uᵀ (τ V), τ V a block of rows at a time
    for start, stop in tau_blocks:
        tau_v[start // columns:stop // columns] = update.read(start, stop).reshape(-1, columns) @ large
    k = vectors.T @ tau_v
    return _Product(vectors, _removed_coefficients_times(k, r, zero_diagonal, large.T))


def project_update(accumulated: torch.Tensor, tau: torch.Tensor, alpha: float, zero_diagonal: bool) -> torch.Tensor:
    """D = τ − U_r (U_rᵀ τ V_r) V_rᵀ [− Σ_{i≥r} (u_iᵀ τ v_i) u_i v_iᵀ] for tensors in memory, in place of ``tau``:
    what a fold computes piece by piece."""
    removal = update_removal(InMemory(accumulated), InMemory(tau), (tau.shape[0], tau.shape[1]), alpha, zero_diagonal)
    return tau if removal is None else tau.sub_(removal.read().reshape(tau.shape))


class OPCM(MergeMethod):
    name = "opcm"
    merged_after_finish = True
    params = {
        "alpha": Param(0.5, float, _alpha_range, "share of S's spectrum protected from new updates"),
        "zero_diagonal": Param(False, bool, help="also remove the diagonal coefficients (FusionBench's code)"),
        "project": Param([], list, _regex_list, "regexes of 2-D tensors to project besides the default rule"),
        "skip": Param([], list, _regex_list, "regexes of tensors never to project"),
    }

    def state_kinds(self) -> tuple[str, ...]:
        return ("sum",)

    def is_projected(self, name: str, shape: tuple[int, ...]) -> bool:
        if len(shape) != 2 or any(re.search(p, name) for p in self.p["skip"]):
            return False
        if any(re.search(p, name) for p in self.p["project"]):
            return True
        # Embedding-like matrices are rows of a lookup table, not linear maps: projecting them is meaningless.
        return name.endswith(".weight") and not is_embedding(name)

    def prepares_ahead(self, name: str, shape: tuple[int, ...]) -> bool:
        return self.t > 1 and self.is_projected(name, shape)  # projections are independent of each other

    def prepare(self, name: str, base: StoredTensor, new: StoredTensor,
                state: Mapping[str, StoredTensor]) -> Prepared | None:
        """The part of the update to remove, piece by piece; None if nothing is removed from this tensor."""
        if not state or not self.is_projected(name, base.shape):
            return None
        rows, columns = base.shape
        return update_removal(state["sum"], _Difference(new, base), (rows, columns), self.p["alpha"],
                              self.p["zero_diagonal"])

    def begin(self, arrival: Arrival) -> None:
        super().begin(arrival)
        self._tau_sq: dict[str, float] = {}  # per tensor (a tensor's pieces come in order on one thread)
        self._sum_sq: dict[str, float] = {}

    def fold(self, piece: Piece, base: torch.Tensor, new: torch.Tensor, state: dict[str, torch.Tensor],
             prepared: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``prepared``: this piece of what is removed from the update (the projection), if anything is."""
        tau = new.sub_(base)
        name = piece.name
        self._tau_sq[name] = self._tau_sq.get(name, 0.0) + sum_of_squares(tau)
        if not state:
            accumulated = tau
        else:
            accumulated = state["sum"].add_(tau if prepared is None else tau.sub_(prepared))
        self._sum_sq[name] = self._sum_sq.get(name, 0.0) + sum_of_squares(accumulated)
        return {"sum": accumulated}

    def finish(self) -> None:
        super().finish()
        norms = [*self.scalars.get("task_norms", []), math.sqrt(math.fsum(self._tau_sq.values()))]
        self.scalars["task_norms"] = norms
        self.scalars["sum_norm"] = math.sqrt(math.fsum(self._sum_sq.values()))

    def merged(self, piece: Piece, base: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        norms, sum_norm = self.scalars["task_norms"], self.scalars["sum_norm"]
        scale = (sum(norms) / len(norms)) / sum_norm if sum_norm else 0.0
        return torch.add(base, state["sum"], alpha=scale)
