"""A matrix kept as two factors, S = left @ right (m×k and k×n, k small): its SVD and recompression, never forming S.

With left = Q_L R_L and rightᵀ = Q_R R_R (thin QR), S = Q_L (R_L R_Rᵀ) Q_Rᵀ, so the SVD of the k×k core
R_L R_Rᵀ = U_c Σ V_cᵀ gives S's: U = Q_L U_c, V = Q_R V_c, the singular values exact to float precision. A sum of
factored terms is factored by stacking their factors and taking the SVD of the stack the same way, keeping only the
singular values that are not zero to float precision. Everything is float64: it is (m + n)·k numbers, and O((m + n)k²)
arithmetic against O(mn·min(m, n)) for the SVD of S itself.
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
    u_core, singular, v_core_t = torch.linalg.svd(core)
    return FactoredSVD(q_left, q_right, core, u_core, singular, v_core_t.T)


def recompressed(left: torch.Tensor, right: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(left', right', ‖S‖²)`` with left' @ right' = S = left @ right in as few columns as its rank to float
    precision, left' = U Σ and right' = Vᵀ (float32), padded with zeros to ``width`` columns (``width`` ≥ rank)."""
    svd = factored_svd(left, right)
    rank = svd.resolved()
    singular = svd.singular[:rank]
    new_left = torch.zeros(left.shape[0], width, dtype=torch.float32)
    new_right = torch.zeros(width, right.shape[1], dtype=torch.float32)
    new_left[:, :rank] = (svd.q_left @ svd.u_core[:, :rank]) * singular
    new_right[:rank] = (svd.q_right @ svd.v_core[:, :rank]).T
    return new_left, new_right, float(singular.square().sum())


def product_sum_of_squares(left: torch.Tensor, right: torch.Tensor) -> float:
    """‖left @ right‖² = trace((leftᵀ left)(right rightᵀ)) without forming the product."""
    left, right = left.double(), right.double()
    return float(((left.T @ left) * (right @ right.T)).sum())
