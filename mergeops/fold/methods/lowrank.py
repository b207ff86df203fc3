"""A matrix kept as two factors, S = left @ right (m×k and k×n, k small): its SVD, and S plus a low-rank term,
never forming S.

With left = Q_L R_L and rightᵀ = Q_R R_R (thin QR), S = Q_L (R_L R_Rᵀ) Q_Rᵀ, so the SVD of the k×k core
R_L R_Rᵀ = U_c Σ V_cᵀ gives S's: U = Q_L U_c, V = Q_R V_c, the singular values exact to float precision. A
low-rank term is added by extending the bases with its factors (orthogonalised against them) and taking the SVD of
the core in the extended bases, keeping only the singular values that are not zero to float precision. Everything
is float64: it is (m + n)·k numbers, and O((m + n)k²) arithmetic against O(mn·min(m, n)) for the SVD of S itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# σ_i² / σ_1² at or below which a singular value is zero to float32 precision (OPCM's floor for S's directions).
ZERO_FLOOR = 1e-14


@dataclass(frozen=True)
class FactoredSVD:
    """The thin SVD of left @ right = q_left @ core @ q_rightᵀ, core = u_core diag(singular) v_coreᵀ (descending)."""

    q_left: torch.Tensor  # m×k, orthonormal columns
    q_right: torch.Tensor  # n×k
    core: torch.Tensor  # k×k
    u_core: torch.Tensor
    singular: torch.Tensor
    v_core: torch.Tensor

    def resolved(self) -> int:
        """How many leading singular values are not zero to float32 precision relative to the largest."""
        squares = self.singular.square()
        return int((squares > ZERO_FLOOR * squares[0]).sum()) if squares.numel() and bool(squares[0] > 0) else 0


def factored_svd(left: torch.Tensor, right: torch.Tensor) -> FactoredSVD:
    """The thin SVD of left @ right (float64), from QR decompositions of the factors and the SVD of a k×k core."""
    q_left, r_left = torch.linalg.qr(left.double())
    q_right, r_right = torch.linalg.qr(right.double().T)
    core = r_left @ r_right.T
    return FactoredSVD(q_left, q_right, core, *_svd(core))


def _extended(basis: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, C)`` with Q = [basis, Q_B] orthonormal and [basis, columns] = Q [[I, C_top], [0, C_bottom]] (C is
    the right block): ``columns`` orthogonalised against ``basis`` (block Gram–Schmidt, twice, which keeps the rest
    orthogonal to float64 precision), then a QR decomposition of the rest, as wide as ``columns`` only."""
    coefficients = basis.T @ columns
    rest = columns - basis @ coefficients
    again = basis.T @ rest
    rest -= basis @ again
    q_rest, r_rest = torch.linalg.qr(rest)
    return torch.cat([basis, q_rest], 1), torch.cat([coefficients + again, r_rest])


def plus_product(svd: FactoredSVD, middle: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                 width: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(L, R, ‖S‖²)`` with L R = S = Q_L middle Q_Rᵀ + left @ right (Q_L, Q_R: ``svd``'s bases, ``middle`` k×k)
    in as few columns as its rank to float precision, L = U Σ and R = Vᵀ (float32), padded with zeros to
    ``width`` columns (at least that rank). [Q_L middle, left] = [Q_L, Q_B] [[middle, C], [0, R_B]] and likewise on
    the right, so only the SVD of a (k + r)-square core is left."""
    k, rank = middle.shape[0], left.shape[1]
    q_left, c_left = _extended(svd.q_left, left.double())
    q_right, c_right = _extended(svd.q_right, right.double().T)
    left_core = torch.zeros(k + rank, k + rank, dtype=torch.float64)
    right_core = torch.zeros_like(left_core)
    left_core[:k, :k], left_core[:, k:] = middle, c_left
    right_core[:k, :k], right_core[:, k:] = torch.eye(k, dtype=torch.float64), c_right
    product = left_core @ right_core.T
    core = FactoredSVD(q_left, q_right, product, *_svd(product))
    kept = core.resolved()
    singular = core.singular[:kept]
    new_left = torch.zeros(q_left.shape[0], width, dtype=torch.float32)
    new_right = torch.zeros(width, q_right.shape[0], dtype=torch.float32)
    new_left[:, :kept] = (q_left @ core.u_core[:, :kept]) * singular
    new_right[:kept] = (q_right @ core.v_core[:, :kept]).T
    return new_left, new_right, float(singular.square().sum())


def _svd(core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, σ, V) of a small square matrix, σ descending."""
    u, singular, v_t = torch.linalg.svd(core)
    return u, singular, v_t.T


def product_sum_of_squares(left: torch.Tensor, right: torch.Tensor) -> float:
    """‖left @ right‖² = trace((leftᵀ left)(right rightᵀ)) without forming the product. Never below 0: factors whose
    product cancels (an adapter's columns that undo each other) round the trace to a tiny negative number, whose
    square root would fail the fold."""
    left, right = left.double(), right.double()
    return max(0.0, float(((left.T @ left) * (right @ right.T)).sum()))
