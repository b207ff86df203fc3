"""Composable parts of task-vector methods: sparsifiers, consensus rules, and metric weights.

Sparsifiers keep part of a task vector: :func:`trim` (TIES: the largest magnitudes, against a model-wide
threshold from :class:`~mergeops.fold.topk.KthLargest`) and :func:`drop_and_rescale` (DARE: a random share, rescaled
so the expectation is unchanged). Consensus rules combine the running merge with a new (sparsified) task vector:
:func:`add`, :func:`running_mean`, :func:`max_magnitude` (MagMax) and :func:`agreeing_sum` (TIES's sign
election). A method is a choice of parts: DARE is task arithmetic with ``drop_and_rescale``; DARE-TIES is continual
TIES with ``drop_and_rescale`` in place of trimming.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from mergeops.fold.methods.base import Piece

# -- sparsifiers ------------------------------------------------------------------------------------


def trim(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """The entries of magnitude at least ``threshold``; the others zero."""
    return torch.where(values.abs() >= threshold, values, 0.0)


# splitmix64's constants as signed 64-bit integers (torch's int64 arithmetic wraps around)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shifted(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x >> bits as an unsigned shift (torch shifts int64 arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniform_by_position(key: str, piece: Piece) -> torch.Tensor:
    """A uniform [0, 1) draw per element of ``piece``, a function of ``key`` and the element's position in its
    tensor only (splitmix64 of the position): the same however the tensor is cut into pieces, on any machine."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little", signed=True)
    x = torch.arange(piece.start, piece.stop, dtype=torch.int64).mul_(_GOLDEN).add_(seed)
    x = (x ^ _shifted(x, 30)).mul_(_MIX1)
    x = (x ^ _shifted(x, 27)).mul_(_MIX2)
    x = x ^ _shifted(x, 31)
    return _shifted(x, 11).double().mul_(2.0 ** -53)


def drop_and_rescale(tau: torch.Tensor, density: float, seed: int, t: int, piece: Piece) -> torch.Tensor:
    """DARE (Yu et al. 2024): keep each entry with probability ``density`` and divide the kept ones by it, in place.
    The draw depends on the seed, the checkpoint's position ``t`` in the stream and the entry's position only."""
    kept = uniform_by_position(f"dare:{seed}:{t}:{piece.name}", piece) < density
    return tau.mul_(kept).div_(density)


# -- consensus --------------------------------------------------------------------------------------


def add(merged: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    return merged.add_(tau)


def running_mean(mean: torch.Tensor, x: torch.Tensor, t: int) -> torch.Tensor:
    """The mean of t values from the mean of the first t − 1 and the t-th: mean + (x − mean)/t, in place."""
    return mean.add_(x.sub_(mean), alpha=1.0 / t)


def max_magnitude(kept: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Per entry, the task vector of largest magnitude so far; ties keep the earlier one (MagMax)."""
    return torch.where(tau.abs() > kept.abs(), tau, kept)


def agreeing_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sign election (TIES): the sum of the entries of ``a`` and ``b`` whose sign agrees with the sign of a + b."""
    sign = torch.sign(a + b)
    return a * (a * sign > 0) + b * (b * sign > 0)


# -- metric weights ---------------------------------------------------------------------------------


def metric_weight(metrics: Mapping[str, float], metric: str, penalty: float) -> float:
    """w = g^penalty with g = 1/loss or g = step (MWA's weight, OTA's multiplier); the metric is there and positive
    (the metrics gate checked it)."""
    value = metrics[metric]
    if not value > 0:
        raise ValueError(f"metric {metric} = {value} must be positive")
    return (1.0 / value if metric == "loss" else value) ** penalty
