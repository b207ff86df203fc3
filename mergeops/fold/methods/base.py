"""The protocol every merge method implements, and how its parameters are declared and checked.

A method sees one floating tensor at a time, in float32: ``fold`` turns (base, new checkpoint, old
state) into new state for that tensor; ``merged`` turns (base, state) into the merged tensor, entry by
entry (it is always handed flat pieces). Global
quantities are gathered in ``survey`` passes before the fold, or during the fold and used by ``merged``
in a second pass (``needs_global``). Everything a method must remember between folds is its state
tensors plus JSON scalars; it never sees older checkpoints (except MWA's window, through ``Arrival``).

A method whose ``fold`` can work a block of rows at a time (``elementwise``, or per tensor ``folds_in_pieces``)
is handed flat, cache-sized pieces of each tensor (whole rows) instead of whole tensors, read from disk and written
back piece by piece: memory for a few pieces instead of a few tensors, and one pass over it while it is in cache.
What such a fold needs to know about the whole tensor first (OTA's mean curvature, OPCM's projection) it gathers
in ``prepare``, which may read the tensor's inputs piece by piece too.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from mergeops.errors import PolicyError
from mergeops.ledger.store import PastCheckpoint
from mergeops.model import ModelFolder, StoredTensor


@dataclass(frozen=True)
class Param:
    """A method parameter: its default, its type, and an optional check returning an error phrase."""

    default: Any
    kind: type | tuple[type, ...]
    check: Callable[[Any], str | None] | None = None
    help: str = ""


def in_unit_interval(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be at least 0"


def between(low: float, high: float) -> Callable[[float], str | None]:
    """A range check; the bounds keep float32 arithmetic meaningful (a λ of 1e39 overflows every merged value)."""
    return lambda value: None if low <= value <= high else f"must be between {low:g} and {high:g}"


SCALE = between(-100, 100)  # scalings of task vectors (λ): far beyond any useful merge, far below overflow


@dataclass
class Arrival:
    """The checkpoint being folded, with what a method may need to know about it."""

    folder: ModelFolder
    resolve_digest: Callable[[], str]  # the checkpoint is hashed while it is folded; this waits for it
    t: int  # 1 for the stream's first checkpoint
    metrics: Mapping[str, float] = field(default_factory=dict)
    history: tuple[PastCheckpoint, ...] = ()  # accepted checkpoints before this one, oldest first

    @property
    def digest(self) -> str:
        return self.resolve_digest()


class MergeMethod:
    """Base class of the merge methods; a subclass in ``mergeops/fold/methods/`` registers itself."""

    name: ClassVar[str]
    params: ClassVar[dict[str, Param]] = {}
    needs_global: ClassVar[bool] = False  # merged() needs something known only after every tensor folded
    elementwise: bool = False  # fold() treats every entry on its own, so it may be given pieces of any tensor

    def __init__(self, params: Mapping[str, Any], scalars: Mapping[str, Any]) -> None:
        self.p = dict(params)
        self.scalars: dict[str, Any] = dict(scalars)  # saved with the state after each fold
        self.t = int(self.scalars.get("t", 0))
        self.notes: list[str] = []  # things the user should hear about this fold

    # -- declaration -----------------------------------------------------------------------------
    @classmethod
    def check_params(cls, raw: Mapping[str, Any], where: str) -> dict[str, Any]:
        """Fill defaults and check types and ranges; unknown names are errors with a suggestion."""
        checked = {}
        for key, value in raw.items():
            spec = cls.params.get(key)
            if spec is None:
                close = difflib.get_close_matches(key, list(cls.params), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else \
                    f" ({cls.name} takes {', '.join(cls.params) or 'no parameters'})"
                raise PolicyError(f"{where}: unknown parameter {key!r} for method {cls.name}{hint}.")
            kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
            if float in kinds and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                names = " or ".join(k.__name__ for k in kinds)
                raise PolicyError(f"{where}: {key} must be a {names}, not {value!r}.")
            if isinstance(value, float) and not math.isfinite(value):
                raise PolicyError(f"{where}: {key} must be a finite number, not {value!r}.")
            problem = spec.check(value) if spec.check else None
            if problem:
                raise PolicyError(f"{where}: {key} {problem}, not {value!r}.")
            checked[key] = value
        return {key: checked.get(key, spec.default) for key, spec in cls.params.items()}

    def state_kinds(self) -> tuple[str, ...]:
        """Names of the per-tensor state tensors this method keeps (each float32, the tensor's shape)."""
        raise NotImplementedError

    def metrics_needed(self) -> tuple[str, ...]:
        """Training metrics (``loss``, ``step``) each checkpoint must come with; an eval gate can supply them."""
        return ()

    # -- one fold ------------------------------------------------------------------------------
    def begin(self, arrival: Arrival) -> None:
        """Called once before the tensors of ``arrival`` are seen; may raise RejectedError."""
        self.t = arrival.t

    def survey_needed(self) -> bool:
        """Whether another survey pass over the checkpoint is wanted before folding."""
        return False

    def survey(self, name: str, base: torch.Tensor, new: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        """See one tensor during a survey pass (to gather a model-wide statistic)."""

    def folds_in_pieces(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether ``fold`` may be given pieces (blocks of whole rows, flat) of tensor ``name``; by default, whether
        ``elementwise``."""
        return self.elementwise

    def prepares_ahead(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether ``prepare`` of tensor ``name`` is long work that may run ahead of the fold on a worker thread,
        at once with other tensors' (so it must not change the method's own attributes)."""
        return False

    def prepare(self, name: str, base: StoredTensor, new: StoredTensor,
                state: Mapping[str, StoredTensor]) -> dict[str, Any]:
        """What the fold of tensor ``name`` needs beyond base, checkpoint and state, gathered before it starts:
        ``fold`` gets each entry as a keyword argument. An entry with a ``read(start, stop)`` method (a stored
        tensor of this tensor's shape, like OTA's curvature, or a value computed piece by piece, like OPCM's
        projection) is read in float32, cut into the same pieces as the rest; any other entry is passed as is.
        ``state`` is empty for the stream's first checkpoint."""
        return {}

    def fold(self, name: str, base: torch.Tensor, new: torch.Tensor,
             state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The new state of one tensor; ``state`` is empty for the stream's first checkpoint."""
        raise NotImplementedError

    def finish(self) -> None:
        """Called after every tensor is folded; update ``self.scalars`` here."""
        self.scalars["t"] = self.t

    def merged(self, name: str, base: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The merged value of one tensor from the base and the (new) state."""
        raise NotImplementedError

    def close(self) -> None:
        """Release anything opened in ``begin`` (extra files)."""
