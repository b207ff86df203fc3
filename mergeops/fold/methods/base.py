"""The protocol every merge method implements, and how its parameters are declared and checked.

A method keeps, per floating tensor, a few float32 *state* tensors (named by ``state_kinds``) plus JSON
``scalars``, and never sees older checkpoints except through its state (MWA's window aside). Two calls make a
method, both on flat pieces of whole rows of one tensor, in float32:

- ``fold(piece, base, new, state, prepared)``: the tensor's new state (``state`` is empty for the first checkpoint);
- ``merged(piece, base, state)``: the merged values, entry by entry.

The common case is two pure functions turned into a method by :func:`elementwise`, parameters inferred from their
signatures (``average.py``, ``task_arithmetic.py``). A method that needs more declares it with optional
capabilities, each with a default that does nothing:

- ``begin(arrival)`` / ``finish()``: per checkpoint, before and after its tensors (MWA's weight, OPCM's norms);
- ``survey()``: a model-wide statistic gathered in passes over whole tensors before the fold (TIES's thresholds);
- ``prepare(...)``: what one tensor's fold needs first, as an object whose ``piece(start, stop)`` is handed to
  ``fold`` (OTA's curvature, OPCM's projection); ``prepares_ahead`` marks long preparations that may run on worker
  threads ahead of the fold;
- ``merged_after_finish``: ``merged`` needs scalars known only once every tensor is folded (OPCM's norms), so the
  merged model is written in a second pass;
- ``metrics_needed()`` / ``needs_curvature``: inputs each checkpoint must bring; gates check them before the fold;
- ``state_shapes(...)``: a tensor's state in a layout of the method's own (OPCM keeps a low-rank sum as two factors),
  chosen per tensor and fold. A state tensor shaped otherwise than its tensor is handed to ``fold`` and ``merged``
  unread (a stored tensor, to read what is needed, or in ``prepare``), and ``fold`` returns its new values in
  order, each returned piece following the last (all of it with one piece, if small).
"""

from __future__ import annotations

import difflib
import inspect
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from mergeops.errors import PolicyError, shown
from mergeops.model import StoredTensor
from mergeops.model.finetune import FineTune, FineTuneTensor


@dataclass(frozen=True)
class Param:
    """A method parameter: its default, its type, and an optional check returning an error phrase. In a function
    given to :func:`elementwise` the type may be left out: it is read from the annotation."""

    default: Any
    kind: type | tuple[type, ...] | None = None
    check: Callable[[Any], str | None] | None = None
    help: str = ""


def in_unit_interval(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


def between(low: float, high: float) -> Callable[[float], str | None]:
    """A range check; the bounds keep float32 arithmetic meaningful (a λ of 1e39 overflows every merged value)."""
    return lambda value: None if low <= value <= high else f"must be between {low:g} and {high:g}"


SCALE = between(-100, 100)  # scalings of task vectors (λ): far beyond any useful merge, far below overflow


@dataclass(frozen=True)
class Piece:
    """Where a piece lies: elements [start, stop) of tensor ``name``, flattened (whole rows)."""

    name: str
    start: int
    stop: int


@dataclass(frozen=True)
class PastCheckpoint:
    """A checkpoint already folded into the stream: what MWA's window needs to re-read it."""

    digest: str
    path: Path
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass
class Arrival:
    """The checkpoint being folded, with what a method may need to know about it."""

    checkpoint: FineTune  # read as values of the base's tensors
    resolve_digest: Callable[[], str]  # the checkpoint is hashed while it is folded; this waits for it
    t: int  # 1 for the stream's first checkpoint
    metrics: Mapping[str, float] = field(default_factory=dict)
    history: tuple[PastCheckpoint, ...] = ()  # accepted checkpoints before this one, oldest first
    reopen: Callable[[Path], FineTune] | None = None  # reads an earlier checkpoint's folder as this one is read

    @property
    def digest(self) -> str:
        return self.resolve_digest()


class Prepared(Protocol):
    """What ``prepare`` returns: the part of it that goes with a piece of the tensor. One that has an attribute
    ``needs_values = False`` holds the tensor's whole new state, computed without the tensor's values (OPCM's sums of
    an adapter's factors), and its ‖τ‖² as ``update_sq``: when the merged model is written after ``finish``, the
    engine then reads none of the tensor's pieces and calls ``fold`` once, with the whole tensor's piece, empty
    ``base`` and ``new`` and no state."""

    def piece(self, start: int, stop: int) -> Any: ...


Survey = Callable[[str, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], None]  # (name, base, new, state)


class MergeMethod:
    """Base class of the merge methods; a subclass with a ``name`` in ``mergeops/fold/methods/`` registers itself."""

    name: ClassVar[str]
    params: ClassVar[dict[str, Param]] = {}
    merged_after_finish: ClassVar[bool] = False
    needs_curvature: ClassVar[bool] = False  # each checkpoint brings exp_avg_sq.safetensors (a gate checks it)

    def __init__(self, params: Mapping[str, Any], scalars: Mapping[str, Any] | None = None) -> None:
        self.p = dict(params)
        self.scalars: dict[str, Any] = dict(scalars or {})  # saved with the state after each fold
        self.t = int(self.scalars.get("t", 0))
        self.notes: list[str] = []  # things the user should hear about this fold

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
                raise PolicyError(f"{where}: unknown parameter {shown(key)} for method {cls.name}{hint}.")
            kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
            if float in kinds and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                names = " or ".join(k.__name__ for k in kinds)
                raise PolicyError(f"{where}: {key} must be a {names}, not {shown(value)}.")
            if isinstance(value, float) and not math.isfinite(value):
                raise PolicyError(f"{where}: {key} must be a finite number, not {shown(value)}.")
            problem = spec.check(value) if spec.check else None
            if problem:
                raise PolicyError(f"{where}: {key} {problem}, not {shown(value)}.")
            checked[key] = value
        return {key: checked.get(key, spec.default) for key, spec in cls.params.items()}

    # -- what every method defines -------------------------------------------------------------
    def state_kinds(self) -> tuple[str, ...]:
        """Names of the per-tensor state tensors this method keeps (each float32, the tensor's shape)."""
        raise NotImplementedError

    def fold(self, piece: Piece, base: torch.Tensor, new: torch.Tensor, state: dict[str, torch.Tensor],
             prepared: Any = None) -> dict[str, torch.Tensor]:
        """The new state of one piece; ``prepared`` is ``prepare(...).piece(start, stop)``, if prepare gave one."""
        raise NotImplementedError

    def merged(self, piece: Piece, base: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The merged values of one piece from the base and the (new) state."""
        raise NotImplementedError

    # -- optional capabilities -----------------------------------------------------------------
    def metrics_needed(self) -> tuple[str, ...]:
        """Training metrics (``loss``, ``step``) each checkpoint must come with, positive; gates check them."""
        return ()

    def begin(self, arrival: Arrival) -> None:
        """Called once before the tensors of ``arrival`` are seen."""
        self.t = arrival.t

    def survey(self) -> Survey | None:
        """The model-wide statistic still to gather in a pass over every floating tensor before folding, as a
        function seeing one tensor (name, base, new, state); None once there is none left."""
        return None

    def prepares_ahead(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether ``prepare`` of tensor ``name`` is long work that may run ahead of the fold on a worker thread,
        at once with other tensors' (so it must not change the method's own attributes)."""
        return False

    def prepare(self, name: str, base: StoredTensor, new: StoredTensor,
                state: Mapping[str, StoredTensor]) -> Prepared | None:
        """What the fold of tensor ``name`` needs beyond base, checkpoint and state, gathered before it starts
        (``state`` is empty for the stream's first checkpoint); inputs may be read piece by piece."""
        return None

    def state_shapes(self, name: str, shape: tuple[int, ...], old: Mapping[str, tuple[int, ...]],
                     new: FineTuneTensor) -> dict[str, tuple[int, ...]]:
        """The state tensors this fold writes for tensor ``name`` of ``shape`` (kind -> shape), given those of the old
        state (``old``, empty for the stream's first checkpoint) and the checkpoint's tensor ``new``: by default
        every kind of ``state_kinds``, shaped like the tensor. Raises PolicyError if ``old`` is not a state this
        method writes (a damaged state folder)."""
        layout = {kind: shape for kind in self.state_kinds()}
        if old and old != layout:
            raise damaged_state(self.name, name, old)
        return layout

    def finish(self) -> None:
        """Called after every tensor is folded; update ``self.scalars`` here."""
        self.scalars["t"] = self.t

    def close(self) -> None:
        """Release anything opened in ``begin`` (extra files)."""


def damaged_state(method: str, name: str, found: Mapping[str, tuple[int, ...]]) -> PolicyError:
    shapes = ", ".join(f"{kind} {list(shape)}" for kind, shape in found.items()) or "nothing"
    return PolicyError(f"the stream's state holds {shapes} for tensor {name!r}, which {method} never writes: the state "
                       "folder is damaged; run `mergeops audit`, and restore the stream's home from a backup.")


# -- the common case: two pure functions --------------------------------------------------------------
CONTEXT = ("t", "piece")  # keyword arguments the engine supplies rather than the policy


def elementwise(name: str, fold: Callable[..., Any], merged: Callable[..., torch.Tensor]) -> type[MergeMethod]:
    """A merge method from two pure functions of tensors, entry by entry:

    - ``fold(base, new, *state, **keywords)`` returns the new state (a tensor, or a tuple in state order); each
      state argument is None for the stream's first checkpoint;
    - ``merged(base, *state, **keywords)`` returns the merged values; its positional parameters after ``base``
      name the state tensors.

    Keyword-only parameters are the method's parameters, each defaulting to a :class:`Param` (type from the
    annotation; a trailing underscore is dropped, so ``lambda_`` is the policy's ``lambda``), except ``t`` (the
    checkpoint's position in the stream, 1 for the first) and ``piece`` (which :class:`Piece` is folded).
    """
    signatures = [(fn, inspect.signature(fn)) for fn in (fold, merged)]
    positional = [tuple(p.name for p in signature.parameters.values()
                        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD) for _, signature in signatures]
    kinds = positional[1][1:]
    if positional[0][2:] != kinds:  # the engine passes state by position: both functions must name it alike
        raise TypeError(f"{name}: fold's state arguments {positional[0][2:]} differ from merged's {kinds}")
    params: dict[str, Param] = {}
    keywords: list[dict[str, str]] = []  # per function: argument name -> parameter name (or context)
    for fn, signature in signatures:
        hints = typing.get_type_hints(fn)
        names = {}
        for argument in signature.parameters.values():
            if argument.kind is not inspect.Parameter.KEYWORD_ONLY:
                continue
            names[argument.name] = argument.name
            if argument.name in CONTEXT:
                continue
            if not isinstance(argument.default, Param):
                raise TypeError(f"{name}: keyword argument {argument.name!r} must default to a Param")
            key = argument.name.rstrip("_")
            names[argument.name] = key
            declared = argument.default
            if declared.kind is None:
                declared = replace(declared, kind=hints[argument.name])
            if not isinstance(declared.kind, type) or params.get(key, declared) != declared:
                raise TypeError(f"{name}: parameter {key!r} needs one plain type (declare kind= for a union) and one "
                                "declaration in fold and merged")
            params[key] = declared
        keywords.append(names)

    def arguments(method: MergeMethod, names: dict[str, str], piece: Piece) -> dict[str, Any]:
        context = {"t": method.t, "piece": piece}
        return {arg: context[key] if arg in CONTEXT else method.p[key] for arg, key in names.items()}

    def fold_piece(self: MergeMethod, piece: Piece, base: torch.Tensor, new: torch.Tensor,
                   state: dict[str, torch.Tensor], prepared: Any = None) -> dict[str, torch.Tensor]:
        values = fold(base, new, *(state.get(k) for k in kinds), **arguments(self, keywords[0], piece))
        return dict(zip(kinds, values if isinstance(values, tuple) else (values,), strict=True))

    def merged_piece(self: MergeMethod, piece: Piece, base: torch.Tensor,
                     state: dict[str, torch.Tensor]) -> torch.Tensor:
        return merged(base, *(state[k] for k in kinds), **arguments(self, keywords[1], piece))

    module = inspect.getmodule(fold)
    return type("".join(part.title() for part in name.split("_")), (MergeMethod,), {
        "__doc__": module.__doc__ if module else None, "__module__": fold.__module__,
        "name": name, "params": params, "state_kinds": lambda self: kinds,
        "fold": fold_piece, "merged": merged_piece})
