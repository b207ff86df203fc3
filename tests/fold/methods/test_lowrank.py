"""A matrix kept as factors: its SVD from the factors equals the SVD of the matrix itself, a product added to it is
kept in as many columns as the sum's rank, and its norm comes from the factors."""

from __future__ import annotations

import pytest
import torch

from mergeops.fold.methods.lowrank import factored_svd, plus_product, product_sum_of_squares


def factors(rows: int, rank: int, columns: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=g, dtype=torch.float64), \
        torch.randn(rank, columns, generator=g, dtype=torch.float64)


def test_the_svd_from_the_factors_is_the_svd_of_their_product():
    left, right = factors(40, 5, 30)
    product = left @ right
    svd = factored_svd(left, right)
    u, singular, vh = torch.linalg.svd(product)
    torch.testing.assert_close(svd.singular, singular[:5], rtol=1e-12, atol=0)
    u_ours, v_ours = svd.q_left @ svd.u_core, svd.q_right @ svd.v_core
    torch.testing.assert_close(u_ours.T @ u_ours, torch.eye(5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close((u_ours * svd.singular) @ v_ours.T, product, atol=1e-12, rtol=0)
    # the same singular vectors (up to sign), as the singular values are distinct
    torch.testing.assert_close((u_ours.T @ u[:, :5]).abs(), torch.eye(5, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close((v_ours.T @ vh[:5].T).abs(), torch.eye(5, dtype=torch.float64), atol=1e-9, rtol=0)
    assert svd.resolved() == 5


def test_a_product_added_to_a_factored_matrix_is_kept_in_as_many_columns_as_the_rank_of_the_sum():
    left, right = factors(30, 3, 20)
    svd = factored_svd(left, right)
    middle = svd.core.clone()
    # an update of rank two whose second direction lies in the matrix's own subspaces: the sum has rank four
    extra_left, extra_right = factors(30, 2, 20, seed=1)
    extra_left[:, 1], extra_right[1] = left[:, 0] - 2 * left[:, 2], right[1]
    new_left, new_right, sum_sq = plus_product(svd, middle, extra_left, extra_right, width=6)
    assert new_left.shape == (30, 6) and new_right.shape == (6, 20)
    assert new_left[:, :4].norm(dim=0).min() > 0 and not new_left[:, 4:].any() and not new_right[4:].any()
    expected = left @ right + extra_left @ extra_right
    scale = float(expected.abs().max())
    torch.testing.assert_close((new_left @ new_right).double(), expected, rtol=0, atol=1e-6 * scale)
    assert sum_sq == pytest.approx(float(expected.square().sum()), rel=1e-12)


def test_a_zero_product_has_rank_zero_and_adding_nothing_keeps_it_so():
    left, right = torch.zeros(5, 2), torch.zeros(2, 4)
    svd = factored_svd(left, right)
    assert svd.resolved() == 0
    new_left, new_right, sum_sq = plus_product(svd, svd.core, torch.zeros(5, 0), torch.zeros(0, 4), width=2)
    assert sum_sq == 0.0 and not new_left.any() and not new_right.any()


def test_the_norm_of_a_product_comes_from_its_factors():
    left, right = factors(50, 4, 60, seed=3)
    assert product_sum_of_squares(left, right) == pytest.approx(float((left @ right).square().sum()), rel=1e-12)


def test_the_norm_of_factors_that_cancel_is_never_negative():
    # An adapter's rank-2 update whose two columns cancel: left @ right is ~1e-16, and the trace of the factors'
    # Gram matrices rounds to below zero; a negative ‖τ‖² made the fold's square root fail (math domain error).
    left = torch.tensor([[0.39229682087898254, 0.039229683578014374]])
    right = torch.tensor([[-0.223564013838768], [2.235640048980713]])
    assert product_sum_of_squares(left, right) >= 0.0
