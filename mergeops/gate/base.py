"""What a gate is: a small object with one method, ``check(subject)``, that passes (returning the name recorded with
the version, or None when there is nothing worth recording) or raises RejectedError naming itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from mergeops.model import ModelFolder


@dataclass
class Subject:
    """What the gates look at, and what they found. Gates of the checkpoint and inputs phases run before the fold and
    see ``checkpoint`` and (inputs) ``metrics``; gates of the candidate phase run after it and see the merged
    ``candidate`` folder and the update norms."""

    checkpoint: ModelFolder  # its weights: a model's, or a LoRA adapter's factors
    base: ModelFolder
    metrics: dict[str, float]
    tick: Callable[[], None] | None = None  # call about once a second during long checks (the daemon's watchdog)
    candidate: Path | None = None
    update_norm: float | None = None  # ‖τ‖ over the floating tensors
    base_norm: float | None = None  # ‖θ0‖ over the same tensors (measured while the stream has no update history)
    accepted_norms: list[float] = field(default_factory=list)  # update norms of the stream's accepted checkpoints
    mergelock: dict[str, Any] | None = None  # the marks of a protected checkpoint the policy allows, recorded with it
    eval_metrics: dict[str, float] = field(default_factory=dict)  # what the eval gate measured on the candidate


Phase = Literal["checkpoint", "inputs", "candidate"]
#: In order: what the checkpoint is (protected? licensed? signed?), then what it brings for its method (curvature,
#: metrics), then the merged candidate the fold made from it.
PHASES: tuple[Phase, ...] = ("checkpoint", "inputs", "candidate")


class Gate(Protocol):
    name: ClassVar[str]
    phase: ClassVar[Phase]

    def check(self, subject: Subject) -> str | None: ...
