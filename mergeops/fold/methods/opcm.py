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

Low-rank updates (LoRA adapters). While every update of a projected tensor has come as factors, S has rank at most
the sum of their ranks, and the state keeps it as factors, S = L R (state kinds ``sum.left`` m×k and ``sum.right``
k×n instead of ``sum``): the projection takes S's SVD from the factors (``lowrank.py``), D's factors lie in
[Q_L, B] and [Q_R, Aᵀ] for τ = B A, and S + D is recompressed to its rank; the merged model is θ0 + scale·L R, a
block of rows at a time. A full checkpoint, or k growing past where the dense fold is cheaper
(:func:`max_factored_rank`), makes S dense once, for good.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from mergeops.fold.methods.base import Arrival, MergeMethod, Param, Piece, Prepared, damaged_state
from mergeops.fold.methods.lowrank import ZERO_FLOOR, FactoredSVD, factored_svd, plus_product, product_sum_of_squares
from mergeops.model import InMemory, Pieces, StoredTensor, piece_bounds
from mergeops.model.architectures import is_embedding
from mergeops.model.finetune import FineTuneTensor

# ZERO_FLOOR: σ_i² / σ_1² at or below which S's i-th singular direction is below float32's resolution of S: its
# singular vectors are arbitrary (in any SVD of S), so it is neither protected nor has its diagonal coefficient removed.
Factors = tuple[torch.Tensor, torch.Tensor]


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
    resolved = eigenvalues > ZERO_FLOOR * eigenvalues[0]  # a leading run of them
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


def max_factored_rank(rows: int, columns: int) -> int:
    """The largest rank k at which a rows×columns tensor's sum stays factored: about where a factored step (QR,
    recompression and the merged output's L R, O((m + n)k² + mnk)) costs as much as a dense one (the SVD of S,
    O(mn·min(m, n))), measured on 1024², 256×1024, 2816×1024 and 1024×2816 (benchmarks/RESULTS.md). It stays
    below min(rows, columns), so a factor is never shaped like the tensor."""
    return min(rows, columns) // 2


def low_rank_update(new: FineTuneTensor | StoredTensor) -> Factors | None:
    """τ as factors ``(left, right)`` if the checkpoint stores it so (zero-width ones for a tensor an adapter leaves
    alone: its τ is exactly zero), None for a dense update (a full checkpoint)."""
    return getattr(new, "factors", None)


def _read_factors(state: Mapping[str, StoredTensor]) -> Factors:
    left, right = state["sum.left"], state["sum.right"]
    return left.read().reshape(left.shape), right.read().reshape(right.shape)


def _factored_coefficients(u: torch.Tensor, v: torch.Tensor, factors: Factors) -> torch.Tensor:
    """K = Uᵀ τ V (float64) for τ = left @ right."""
    left, right = factors
    return (u.T @ left.double()) @ (right.double() @ v)


def _update_coefficients(u: torch.Tensor, v: torch.Tensor, factors: Factors | None, update: Pieces,
                         shape: tuple[int, int]) -> torch.Tensor:
    """K = Uᵀ τ V (float64), from τ's factors if it has them, else from a pass over τ's rows."""
    if factors is not None:
        return _factored_coefficients(u, v, factors)
    columns = shape[1]
    tau_v = torch.empty(shape[0], v.shape[1], dtype=torch.float64)
    for start, stop in piece_bounds(shape):
        tau_v[start // columns:stop // columns] = update.read(start, stop).reshape(-1, columns).double() @ v
    return u.T @ tau_v


@dataclass(frozen=True)
class _FactoredSum:
    """The new state of a tensor whose sum stays factored, S = left @ right, with ‖τ‖² and ‖S‖²; all of it goes with
    the tensor's first piece."""

    left: torch.Tensor
    right: torch.Tensor
    update_sq: float
    sum_sq: float
    needs_values: ClassVar[bool] = False  # computed from the factors: the engine need not read the tensor

    def piece(self, start: int, stop: int) -> _FactoredSum:
        return self


@dataclass(frozen=True)
class _Densified:
    """A factored sum made dense by this fold: pieces of S and of what is removed from the update (if anything)."""

    accumulated: _Product
    removal: _Product | None

    def piece(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.accumulated.piece(start, stop), None if self.removal is None else self.removal.piece(start, stop)


class OPCM(MergeMethod):
    name = "opcm"
    merged_after_finish = True
    params = {
        "alpha": Param(0.5, float, _alpha_range, "share of S's spectrum protected from new updates"),
        "zero_diagonal": Param(False, bool, help="also remove the diagonal coefficients (FusionBench's code)"),
        "project": Param([], list, _regex_list, "regexes of 2-D tensors to project besides the default rule"),
        "skip": Param([], list, _regex_list, "regexes of tensors never to project"),
    }

    _merged_right: tuple[str, torch.Tensor] | None = None  # the tensor whose factored sum ``merged`` writes, its R

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

    def factored_width(self, shape: tuple[int, ...], old: Mapping[str, tuple[int, ...]],
                       update: Factors | None) -> int | None:
        """How many columns this fold keeps the tensor's sum in as factors, or None to keep it dense: factored while
        every update of a projected tensor has come as factors and their ranks add up to at most
        :func:`max_factored_rank`. For a projected tensor."""
        if update is None or (old and "sum.left" not in old):
            return None
        width = (old["sum.left"][1] if old else 0) + update[0].shape[1]
        return width if width <= max_factored_rank(shape[0], shape[1]) else None

    def state_shapes(self, name: str, shape: tuple[int, ...], old: Mapping[str, tuple[int, ...]],
                     new: FineTuneTensor) -> dict[str, tuple[int, ...]]:
        rows, columns = shape if len(shape) == 2 else (0, 0)
        factored = len(old) == 2 and old.get("sum.left", (0, -1))[0] == rows and \
            old.get("sum.right", (-1, 0))[1] == columns and old["sum.left"][1] == old["sum.right"][0]
        if old and old != {"sum": shape} and not (factored and self.is_projected(name, shape)):
            raise damaged_state(self.name, name, old)
        width = self.factored_width(shape, old, low_rank_update(new)) if self.is_projected(name, shape) else None
        if width is None:
            return {"sum": shape}
        return {"sum.left": (shape[0], width), "sum.right": (width, shape[1])}

    def prepare(self, name: str, base: StoredTensor, new: StoredTensor,
                state: Mapping[str, StoredTensor]) -> Prepared | None:
        """The part of the update to remove, piece by piece (with a factored sum's pieces if it is made dense now),
        or the new state whole if it stays factored; None if nothing is removed from this tensor."""
        if not self.is_projected(name, base.shape):
            return None
        rows, columns = base.shape
        update = low_rank_update(new)
        width = self.factored_width(base.shape, {k: v.shape for k, v in state.items()}, update)
        if width is not None:
            return self._factored_sum(state, update, width)
        if not state:
            return None
        if "sum" in state:
            if update is not None and not update[0].shape[1]:
                return None  # an adapter leaves this tensor alone: D = τ = 0
            return update_removal(state["sum"], _Difference(new, base), (rows, columns), self.p["alpha"],
                                  self.p["zero_diagonal"])
        left, right = _read_factors(state)  # a factored sum made dense: by a full checkpoint, or past the rank
        svd = factored_svd(left, right)
        removed = self._removed(svd, lambda u, v: _update_coefficients(u, v, update, _Difference(new, base),
                                                                       (rows, columns)))
        removal = None if removed is None else \
            _Product((svd.q_left @ removed[0]).float(), (removed[1] @ svd.q_right.T).float())
        return _Densified(_Product(left, right), removal)

    def _removed(self, svd: FactoredSVD, coefficients: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What OPCM removes from τ given S's factored SVD: U_c C V_cᵀ, with U = Q_L U_c and V = Q_R V_c over S's
        resolved directions and C of the coefficients K = Uᵀ τ V (``coefficients(U, V)``), as (U_c, C V_cᵀ);
        None if nothing is removed."""
        resolved = svd.resolved()
        r = min(projection_rank(svd.singular, self.p["alpha"]), resolved)
        if not resolved or (r == 0 and not self.p["zero_diagonal"]):
            return None
        u_core, v_core = svd.u_core[:, :resolved], svd.v_core[:, :resolved]
        k = coefficients(svd.q_left @ u_core, svd.q_right @ v_core)
        return u_core, _removed_coefficients_times(k, r, self.p["zero_diagonal"], v_core.T)

    def _factored_sum(self, state: Mapping[str, StoredTensor], update: Factors, width: int) -> _FactoredSum:
        """S + D as factors for S = L R and τ = B A: S − U_r K V_rᵀ = Q_L (core − U_c C V_cᵀ) Q_Rᵀ, so S + D is
        that plus B A, whose factors lie in [Q_L, B] and [Q_R, Aᵀ]; recompressed to its rank."""
        b, a = update
        update_sq = product_sum_of_squares(b, a)
        if not state:
            return _FactoredSum(b.contiguous(), a.contiguous(), update_sq, update_sq)
        svd = factored_svd(*_read_factors(state))
        removed = self._removed(svd, lambda u, v: _factored_coefficients(u, v, update))
        middle = svd.core if removed is None else svd.core - removed[0] @ removed[1]
        left, right, sum_sq = plus_product(svd, middle, b, a, width)
        return _FactoredSum(left, right, update_sq, sum_sq)

    def begin(self, arrival: Arrival) -> None:
        super().begin(arrival)
        self._tau_sq: dict[str, float] = {}  # per tensor (a tensor's pieces come in order on one thread)
        self._sum_sq: dict[str, float] = {}

    def fold(self, piece: Piece, base: torch.Tensor, new: torch.Tensor, state: dict[str, torch.Tensor],
             prepared: torch.Tensor | tuple[torch.Tensor, torch.Tensor | None] | _FactoredSum | None = None
             ) -> dict[str, torch.Tensor]:
        """``prepared``: this piece of what is removed from the update (the projection), if anything is; with this
        piece of a factored sum made dense; or a factored sum's whole new state."""
        name = piece.name
        if isinstance(prepared, _FactoredSum):
            if piece.start:
                return {}
            self._tau_sq[name], self._sum_sq[name] = prepared.update_sq, prepared.sum_sq
            return {"sum.left": prepared.left.reshape(-1), "sum.right": prepared.right.reshape(-1)}
        tau = new.sub_(base)
        self._tau_sq[name] = self._tau_sq.get(name, 0.0) + sum_of_squares(tau)
        old = state.get("sum")
        if isinstance(prepared, tuple):
            old, prepared = prepared
        if old is None:
            accumulated = tau
        else:
            accumulated = old.add_(tau if prepared is None else tau.sub_(prepared))
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
        if "sum" in state:
            return torch.add(base, state["sum"], alpha=scale)
        left, right = state["sum.left"], state["sum.right"]  # θ0 + scale·L R, this piece's rows of L
        width, columns = right.shape
        if self._merged_right is None or self._merged_right[0] != piece.name:  # a tensor's pieces come in order
            self._merged_right = (piece.name, right.read().reshape(width, columns))
        first, last = piece.start // columns, piece.stop // columns
        rows = left.read(first * width, last * width).reshape(last - first, width)
        return torch.addmm(base.reshape(-1, columns), rows, self._merged_right[1], alpha=scale).reshape(-1)
