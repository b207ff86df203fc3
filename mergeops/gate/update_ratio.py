"""The max_update_ratio gate (SPEC §6): a checkpoint whose task vector is far larger than the accepted ones' may be
corrupted or poisoned."""

from __future__ import annotations

import statistics

from mergeops.errors import RejectedError
from mergeops.gate.base import Subject


class UpdateRatioGate:
    """‖τ‖ at most ``ratio`` times the median of the stream's accepted checkpoints' (measured during the fold)."""

    name = "max_update_ratio"
    phase = "candidate"

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio

    def check(self, subject: Subject) -> str:
        norm, accepted = subject.update_norm, subject.accepted_norms
        if accepted and norm is not None:
            median = statistics.median(accepted)
            if median > 0 and norm > self.ratio * median:
                raise RejectedError(f"the checkpoint's update norm {norm:.4g} is {norm / median:.1f}× the median of "
                                    f"accepted updates ({median:.4g}), above max_update_ratio = {self.ratio}; it may "
                                    "be corrupted or poisoned.", gate=self.name)
        return self.name
