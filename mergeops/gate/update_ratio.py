"""The update-size gates: a checkpoint whose task vector is far larger than the accepted ones' (max_update_ratio,
SPEC §6) or, on a stream with no accepted ones yet, far larger than any fine-tune's relative to the base's weights
(max_base_relative_update), may be corrupted, poisoned, or not a fine-tune of the base at all (a MergeLock-protected
copy with its marks stripped)."""

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


class BaseRelativeUpdateGate:
    """On a stream with no update history, ‖τ‖ at most ``bound`` times ‖θ0‖ (both over the floating tensors)."""

    name = "max_base_relative_update"
    phase = "candidate"

    def __init__(self, bound: float) -> None:
        self.bound = bound

    def check(self, subject: Subject) -> str | None:
        norm, base = subject.update_norm, subject.base_norm
        if subject.accepted_norms or norm is None or not base:
            return None  # with history, max_update_ratio compares with the accepted updates
        if subject.mergelock is not None:
            return None  # a protected checkpoint the policy allows, by its marks: far from the base by design
        if norm > self.bound * base:
            raise RejectedError(f"the checkpoint's update norm {norm:.4g} is {norm / base:.3g}× the base's weight norm "
                                f"{base:.4g}, above max_base_relative_update = {self.bound} for a stream's first "
                                "update: far larger than a fine-tune's, so it may be corrupted, poisoned or not a "
                                "fine-tune of this base (e.g. a MergeLock-protected copy with its marks stripped).",
                                gate=self.name)
        return self.name
