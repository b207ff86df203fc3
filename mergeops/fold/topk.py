"""The exact k-th largest of a model's worth of non-negative values, without holding them.

Radix select on float32 bit patterns (order-preserving for values ≥ 0): a first pass histograms the
high 16 bits and finds the bucket holding the k-th largest; a second pass histograms the low 15 bits
inside that bucket. Two streaming passes, memory of one histogram.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_CHUNK = 1 << 20
_LOW_BITS = 15


class KthLargest:
    """Feed every value in each of two passes (``feed``, then ``next_pass``); then read ``value``.

    ``rank`` maps the number of values d to k (1-based: k = 1 is the maximum), e.g. TIES keeps the
    int(density·d) + 1 largest.
    """

    def __init__(self, rank: Callable[[int], int]) -> None:
        self.rank = rank
        self.passes_done = 0
        self.count = 0
        self._hist = torch.zeros(1 << 16, dtype=torch.int64)
        self._bucket = -1
        self._k_in_bucket = 0
        self.value: float | None = None

    @property
    def done(self) -> bool:
        return self.passes_done == 2

    def feed(self, values: torch.Tensor) -> None:
        for chunk in values.detach().reshape(-1).float().split(_CHUNK):
            bits = chunk.view(torch.int32)
            if self.passes_done == 0:
                self.count += bits.numel()
                self._hist += torch.bincount(bits >> _LOW_BITS, minlength=1 << 16)
            else:
                inside = bits[(bits >> _LOW_BITS) == self._bucket]
                self._hist += torch.bincount(inside & ((1 << _LOW_BITS) - 1), minlength=1 << 16)

    def next_pass(self) -> None:
        k = self._k_in_bucket if self.passes_done else min(max(self.rank(self.count), 1), self.count)
        # find the highest bin b with (count above b) < k <= (count above b) + hist[b]
        above = torch.flip(torch.cumsum(torch.flip(self._hist, [0]), 0), [0]) - self._hist
        b = int(torch.nonzero((above < k) & (above + self._hist >= k))[-1])
        k_left = k - int(above[b])
        if self.passes_done == 0:
            self._bucket, self._k_in_bucket = b, k_left
        else:
            bits = torch.tensor([(self._bucket << _LOW_BITS) | b], dtype=torch.int32)
            self.value = float(bits.view(torch.float32))
        self._hist.zero_()
        self.passes_done += 1
