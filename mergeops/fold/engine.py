"""The fold engine: stream one checkpoint through a merge method, tensor by tensor, into new state and a merged model.

Per tensor the engine reads base, checkpoint and state in cache-sized pieces of whole rows, hands them to the method
in float32, and writes the new state and the merged values straight to disk, piece by piece: memory for a few pieces,
one pass over each while it is in cache. It checks what it streams (finite values, identical integer tensors,
weights actually written) and knows nothing of gates, the ledger or the stream's folders: the pipeline
(``mergeops/pipeline.py``) gives it a :class:`FoldJob` and commits what it returns.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergeops import untrusted
from mergeops.errors import PolicyError, RejectedError
from mergeops.fold.methods.base import MergeMethod, Piece, Prepared
from mergeops.intake.validate import tensor_value_problem
from mergeops.model import ModelFolder, ModelWriter, StoredTensor, TensorSpec, piece_bounds
from mergeops.model.finetune import FineTune
from mergeops.threads import map_ahead, one_torch_thread

STATE_SEPARATOR = "::"  # state tensor names are f"{kind}::{tensor name}"
SCALARS_FILE = "scalars.json"
DIGEST_PLACEHOLDER = "sha256:" + "0" * 64  # as long as a real digest, so the header keeps its length
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def output_dtype(setting: str, stored: torch.dtype) -> torch.dtype:
    """The merged tensor's dtype: the stream's ``dtype`` setting, or the base's (always, for integer tensors)."""
    if setting == "base" or not stored.is_floating_point:
        return stored
    return _DTYPES[setting]


def state_name(kind: str, name: str) -> str:
    return f"{kind}{STATE_SEPARATOR}{name}"


def state_layout(state: ModelFolder | None) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per tensor, the state tensors ``state`` holds for it: kind -> shape (empty without a state)."""
    layout: dict[str, dict[str, tuple[int, ...]]] = {}
    for full_name, info in (state.tensors.items() if state else ()):
        kind, name = full_name.split(STATE_SEPARATOR, 1)
        layout.setdefault(name, {})[kind] = info.shape
    return layout


@dataclass
class FoldJob:
    """Everything one fold reads and where it writes."""

    stream: str
    base: ModelFolder
    checkpoint: FineTune  # the checkpoint read as values of the base's tensors (a full model or an adapter)
    old_state: ModelFolder | None  # None for the stream's first checkpoint
    method: MergeMethod  # begun (``begin``) for this checkpoint
    output_dir: Path
    state_dir: Path
    dtype: str  # the stream's output dtype setting
    metadata: Callable[[str], dict[str, str]]  # the merged model's safetensors metadata, given the checkpoint digest
    digest: Callable[[], str]  # the checkpoint's digest, waiting for it (a duplicate raises, ending the fold)
    digest_known: Callable[[], bool]
    spare_state: Path | None = None  # an old state folder whose files the new state may overwrite
    measure_update: bool = True  # sum ‖τ‖² (for the update gates; about 8% of an elementwise fold's time)
    measure_base: bool = False  # also sum ‖θ0‖² over the same tensors (a stream with no update history yet)
    progress: Callable[[int], None] | None = None  # bytes folded; 0 between tensors (the daemon's stop check)


@dataclass(frozen=True)
class Folded:
    """What a fold wrote: the files of the merged model and of the new state (sha256 each), ‖τ‖ over the floating
    tensors, and ‖θ0‖ over the same tensors when it was asked for."""

    output_files: dict[str, str]
    state_files: dict[str, str]
    update_norm: float | None  # None: not measured (no gate needed it)
    base_norm: float | None = None


def fold(job: FoldJob) -> Folded:
    """Run the fold; raises RejectedError if the checkpoint's values cannot be merged. Whatever it wrote stays for the
    caller to commit or remove."""
    return _Fold(job).run()


@dataclass
class _Fold:
    job: FoldJob
    zero_elements: dict[str, int] = field(default_factory=dict)  # per tensor, checkpoint elements in all-zero pieces
    update_sq: dict[str, float] = field(default_factory=dict)  # ‖τ‖² per tensor, summed exactly at the end
    base_sq: dict[str, float] = field(default_factory=dict)  # ‖θ0‖² per tensor (measure_base)

    def __post_init__(self) -> None:
        job = self.job
        self.old_layout = state_layout(job.old_state)
        self.floating = [n for n, info in job.base.tensors.items() if info.dtype.is_floating_point]
        lacking = [n for n in self.floating if job.old_state is not None and n not in self.old_layout]
        if lacking:
            raise PolicyError(f"the stream's state in {job.old_state.path} lacks tensor {lacking[0]!r}: the state "
                              "folder is damaged; run `mergeops audit`, and restore the stream's home from a backup.")

    def run(self) -> Folded:
        job, method = self.job, self.job.method
        while (see := method.survey()) is not None:
            for name in self.floating:
                self._tick(0)
                see(name, job.base.read(name).float(), job.checkpoint.read(name).float(), self._state(name))
        output_files, state_files = self._fold_pass()
        if output_files is None:  # the merged tensors needed what only finishing told: a second pass
            output_files = self._merge_pass()
        base_norm = math.sqrt(math.fsum(self.base_sq.values())) if job.measure_base else None
        update_norm = math.sqrt(math.fsum(self.update_sq.values())) if job.measure_update else None
        return Folded(output_files, state_files, update_norm, base_norm)

    def _tick(self, nbytes: int) -> None:
        if self.job.progress:
            self.job.progress(nbytes)

    def _state(self, name: str, source: ModelFolder | None = None, start: int = 0, stop: int | None = None,
               layout: dict[str, dict[str, tuple[int, ...]]] | None = None) -> dict[str, torch.Tensor | StoredTensor]:
        """The state of tensor ``name`` in ``source`` (the old one, whose ``layout`` is known): elements [start, stop)
        only, flat, if given, of each state tensor shaped like the tensor; any other (a method's own layout) unread."""
        source = source or self.job.old_state
        if source is None:
            return {}
        shape = self.job.base.tensors[name].shape
        kinds = (self.old_layout if layout is None else layout)[name]
        return {k: source.read(state_name(k, name), start, stop) if kind_shape == shape else
                source.stored(state_name(k, name)) for k, kind_shape in kinds.items()}

    def _output_writer(self) -> ModelWriter:
        """The merged model's writer; until the checkpoint's digest is known its header holds a placeholder."""
        job = self.job
        known = job.digest_known()
        specs = [TensorSpec(n, output_dtype(job.dtype, info.dtype), info.shape) for n, info in job.base.tensors.items()]
        return ModelWriter(job.output_dir, specs, metadata=job.metadata(job.digest() if known else DIGEST_PLACEHOLDER),
                           donor=job.base.path, provisional_metadata=not known)

    def _settle(self, output: ModelWriter, wait: bool) -> None:
        """Give the output its final metadata once the checkpoint's digest is known (``wait``: now)."""
        if output.metadata_is_provisional and (wait or self.job.digest_known()):
            output.settle_metadata(self.job.metadata(self.job.digest()))

    def _fold_pass(self) -> tuple[dict[str, str] | None, dict[str, str]]:
        """Fold every tensor into new state; write merged tensors too when the method can right away."""
        job, method = self.job, self.job.method
        output = None if method.merged_after_finish else self._output_writer()
        order = output.layout_order if output else list(job.base.tensors)
        # The state follows the output's order with one file per kind: pieces of all kinds of a tensor are
        # written at once, and every file still grows front to back (so it is hashed as it is written).
        shapes = {n: method.state_shapes(n, job.base.tensors[n].shape, self.old_layout.get(n, {}),
                                         job.checkpoint.stored(n)) for n in order if n in self.floating}
        kinds = dict.fromkeys(kind for kind_shapes in shapes.values() for kind in kind_shapes)
        state_specs = [TensorSpec(state_name(kind, n), torch.float32, kind_shapes[kind])
                       for kind in kinds for n, kind_shapes in shapes.items() if kind in kind_shapes]
        with ModelWriter(job.state_dir, state_specs, metadata={"mergeops.stream": job.stream},
                         shard_group=lambda spec: spec.name.split(STATE_SEPARATOR, 1)[0],
                         recycle=job.spare_state) as state, \
                output or nullcontext(), \
                closing(self._prepared([n for n in order if n in self.floating])) as prepared:
            for name in order:
                self._tick(job.checkpoint.nbytes(name))
                if name not in self.floating:
                    base = job.base.read(name)
                    self._check_integer(name, job.checkpoint.read(name), base)
                    if output:
                        output.write(name, base)
                    continue
                prepared_name, extra = next(prepared)
                assert prepared_name == name, "tensors are prepared in the order they are written"
                self._fold_tensor(name, extra, state, output)
                del extra  # a projection's factor is not kept while the next one is awaited
                if output:
                    self._settle(output, wait=False)
            self._check_written()
            job.digest()  # a duplicate must stop the fold before its state is kept
            if output:
                self._settle(output, wait=True)
            method.finish()
            state.extra_files[SCALARS_FILE] = scalars_json(method)
        return (output.file_hashes if output else None), state.file_hashes

    def _prepared(self, names: list[str]) -> Iterator[tuple[str, Prepared | None]]:
        """What each tensor's fold needs beyond its inputs (``MergeMethod.prepare``), in order. Long preparations
        (OPCM's projections) are computed ahead on two threads, one torch thread each, while the fold goes on;
        those in flight stay within the two largest preparations' memory."""
        tensors, method = self.job.base.tensors, self.job.method
        ahead = [n for n in names if method.prepares_ahead(n, tensors[n].shape)]
        ahead_names = set(ahead)
        sizes = sorted((tensors[n].numel for n in ahead), reverse=True)
        computed = map_ahead(self._prepare, ahead, workers=2, budget=sum(sizes[:2]), weight=lambda n: tensors[n].numel)
        # a torch thread per tensor, not per operation, while two are prepared at once
        with one_torch_thread() if ahead else nullcontext(), closing(computed):  # workers stop before threads reset
            for name in names:
                yield next(computed) if name in ahead_names else (name, self._prepare(name))

    def _prepare(self, name: str) -> Prepared | None:
        job = self.job
        state = {k: job.old_state.stored(state_name(k, name)) for k in self.old_layout[name]} if job.old_state else {}
        return job.method.prepare(name, job.base.stored(name), job.checkpoint.stored(name), state)

    def _fold_tensor(self, name: str, prepared: Prepared | None, state: ModelWriter,
                     output: ModelWriter | None) -> None:
        """Fold one tensor in cache-sized pieces of whole rows, read from and written to disk piece by piece."""
        job = self.job
        shape = job.base.tensors[name].shape
        if output is None and prepared is not None and not getattr(prepared, "needs_values", True):
            self._fold_computed(name, shape, prepared, state)
            return
        appended: dict[str, int] = {}  # state tensors of their own shape: elements written so far
        with one_torch_thread():  # pieces are too small to share out; the other core hashes what is written
            for start, stop in piece_bounds(shape):
                piece = Piece(name, start, stop)
                new = self._checked_float(name, job.checkpoint.read(name, start, stop))
                base = job.base.read(name, start, stop).float()
                # sums of squares of pieces already in memory (a tensor's pieces come in order on one thread)
                if job.measure_update:
                    self.update_sq[name] = self.update_sq.get(name, 0.0) + _update_sq(new, base)
                if job.measure_base:
                    self.base_sq[name] = self.base_sq.get(name, 0.0) + _sum_sq(base)
                new_state = job.method.fold(piece, base, new, self._state(name, start=start, stop=stop),
                                            prepared.piece(start, stop) if prepared is not None else None)
                for kind, value in new_state.items():
                    full_name = state_name(kind, name)
                    if state.specs[full_name].shape == shape:
                        state.write_piece(full_name, start, value)
                    else:  # written in order from its start, as the method hands it over
                        state.write_piece(full_name, appended.get(kind, 0), value)
                        appended[kind] = appended.get(kind, 0) + value.numel()
                if output:
                    merged = job.method.merged(piece, base, new_state).to(output.specs[name].dtype)
                    output.write_piece(name, start, _finite_merged(name, merged))

    def _fold_computed(self, name: str, shape: tuple[int, ...], prepared: Prepared, state: ModelWriter) -> None:
        """A tensor whose new state ``prepare`` computed without its values (from the checkpoint's factors): one call
        of ``fold`` with the whole tensor's piece and empty values; none of its pieces is read."""
        numel = math.prod(shape)
        empty = torch.empty(0)
        new_state = self.job.method.fold(Piece(name, 0, numel), empty, empty, {}, prepared.piece(0, numel))
        self.update_sq[name] = prepared.update_sq  # type: ignore[attr-defined]
        if self.job.measure_base:  # the one case a fold does not read the base's values: read them for the norm
            self.base_sq[name] = math.fsum(_sum_sq(self.job.base.read(name, start, stop).float())
                                           for start, stop in piece_bounds(shape))
        for kind, value in new_state.items():
            state.write_piece(state_name(kind, name), 0, value)

    def _merge_pass(self) -> dict[str, str]:
        """Write the merged model from the new state, piece by piece (``merged`` is elementwise)."""
        job = self.job
        with ModelFolder.open(job.state_dir) as state, self._output_writer() as writer, one_torch_thread():
            layout = state_layout(state)
            for name in writer.layout_order:
                self._tick(0)
                if name not in self.floating:
                    writer.write(name, job.base.read(name))
                    continue
                for start, stop in piece_bounds(job.base.tensors[name].shape):
                    merged = job.method.merged(Piece(name, start, stop), job.base.read(name, start, stop).float(),
                                               self._state(name, state, start, stop, layout))
                    writer.write_piece(name, start, _finite_merged(name, merged.to(writer.specs[name].dtype)))
        return writer.file_hashes

    def _checked_float(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """``values`` (part or all of the checkpoint's tensor ``name``) in float32, refused if not finite there: a
        finite float64 value beyond float32's range is as unmergeable as a NaN."""
        checkpoint = self.job.checkpoint
        converted = values.float()
        total = float(converted.sum())
        if total == 0.0 and not bool(converted.any()):
            self.zero_elements[name] = self.zero_elements.get(name, 0) + converted.numel()
        if not math.isfinite(total):  # cheap; the exact check (and its message) only if needed
            problem = tensor_value_problem(name, checkpoint.read(name), checkpoint.file_of(name))
            if problem:
                raise RejectedError(problem.message, gate="finite")
            if not bool(torch.isfinite(converted).all()):
                raise RejectedError(f"tensor {name!r} of {checkpoint.path} has values beyond float32's range "
                                    f"(largest magnitude {float(values.abs().max()):.3g}) and merging computes in "
                                    "float32, so it cannot be merged; the checkpoint is corrupted or was saved "
                                    "wrongly.", gate="finite")
        return converted

    def _check_written(self) -> None:
        """A tensor that is all zeros where the base's is not was never written: a weights file preallocated to its
        full length looks complete before its bytes arrive."""
        base = self.job.base
        for name, zeros in self.zero_elements.items():
            shape = base.tensors[name].shape
            if zeros == base.tensors[name].numel and any(
                    bool(base.read(name, start, stop).any()) for start, stop in piece_bounds(shape)):
                raise RejectedError(f"tensor {name!r} of {self.job.checkpoint.path} is all zeros where the base's "
                                    "is not: the weights look preallocated and not yet written; wait until the "
                                    "producer has finished (a completion `marker` in the watch table makes the daemon "
                                    "wait for it).")

    def _check_integer(self, name: str, new: torch.Tensor, base: torch.Tensor) -> None:
        problem = tensor_value_problem(name, new, self.job.checkpoint.file_of(name), expect_floating=False)
        if problem:
            raise RejectedError(problem.message)
        if not torch.equal(new, base):
            raise RejectedError(f"integer tensor {name!r} differs from the base's; integer tensors (buffers, ids) "
                                "must be identical in every checkpoint.")


def _sum_sq(values: torch.Tensor) -> float:
    """Σ x² of a float32 piece: one BLAS dot (relative error ~2e-7 on a 1 MiB piece; pieces are summed in float64),
    5-25 times cheaper than squaring into a float64 sum, so measuring every fold costs next to nothing."""
    flat = values.reshape(-1)
    total = float(torch.dot(flat, flat))
    # a square beyond float32's range (a value above ~1.8e19, finite in a checkpoint) is summed in float64: an
    # infinite norm would pass no gate's comparison sensibly, and the ledger cannot record it
    return total if math.isfinite(total) else float(torch.dot(flat.double(), flat.double()))


def _update_sq(new: torch.Tensor, base: torch.Tensor) -> float:
    """‖new − base‖² of a piece, finite for finite values: where their float32 difference overflows, it is taken in
    float64."""
    total = _sum_sq(new - base)
    return total if math.isfinite(total) else _sum_sq(new.double() - base.double())


def _finite_merged(name: str, merged: torch.Tensor) -> torch.Tensor:
    """A merged piece as it will be stored, refused if any value is not finite: float32 arithmetic on finite inputs
    can overflow (3e38 + 3e38), and so can the cast to the output dtype (float16 ends at 65504)."""
    # A finite sum means every value is finite (NaN and Inf propagate), at a thirtieth of isfinite's cost per piece;
    # only a sum that overflowed on finite values needs the exact check.
    if math.isfinite(float(merged.sum(dtype=torch.float32))) or bool(torch.isfinite(merged).all()):
        return merged
    bad = int((~torch.isfinite(merged)).sum())
    raise RejectedError(f"merging this checkpoint would give tensor {name!r} {bad} non-finite value(s) in "
                        f"{str(merged.dtype).removeprefix('torch.')} (an overflow: its values or its update are too "
                        "large for the arithmetic or the output dtype), so it is rejected and the stream is "
                        "unchanged.", gate="finite")


def scalars_json(method: MergeMethod) -> bytes:
    """The state's scalars file: the method and its parameters (a stream cannot change them), and its scalars."""
    document = {"method": method.name, "params": method.p, "scalars": method.scalars}
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def read_scalars(state_dir: Path) -> dict[str, Any]:
    """The scalars file of a state folder, as written by :func:`scalars_json`."""
    return untrusted.read_json(state_dir / SCALARS_FILE)
