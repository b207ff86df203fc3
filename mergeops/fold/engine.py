"""The fold: merge one checkpoint into a stream, one tensor at a time, and commit the result.

Per tensor the engine reads base, checkpoint and method state, hands them to the method in float32,
and writes the new state and the merged tensor straight to disk. Order of commit, each step atomic:
new state folder -> new version folder -> ``latest`` link -> record. A crash anywhere leaves the
record at the previous version; whatever was written past it is removed and redone on the next fold.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mergeops import __version__, gate
from mergeops.errors import ModelFolderError, PolicyError, RejectedError, UsageError, disk_full, no_space
from mergeops.fold.methods import method_class
from mergeops.fold.methods.base import Arrival, MergeMethod
from mergeops.fold.metrics import load_metrics
from mergeops.intake.validate import problems_against_base, protection_marks, tensor_value_problem
from mergeops.ledger.card import Input, VersionFacts, card_files, read_license
from mergeops.ledger.kinds import CheckpointFacts, LedgerEvent, StreamStarted, VersionCommitted, VersionPruned
from mergeops.ledger.store import Ledger, VersionRecord, utc_now, writing
from mergeops.model import ModelFolder, ModelWriter, Pieces, TensorSpec, folder_digest, piece_bounds
from mergeops.model.digest import BackgroundDigest, digest_of_listing
from mergeops.model.folder import INDEX_FILE
from mergeops.model.writer import TEMP_MARKER
from mergeops.policy import Policy, StreamConfig
from mergeops.threads import map_ahead, one_torch_thread, quick_gil_handoff

STATE_SEPARATOR = "::"  # state tensor names are f"{kind}::{tensor name}"
SCALARS_FILE = "scalars.json"
_VERSION_DIR = re.compile(r"^v(\d{4,})$")
# The newest pruned state, whose files the next fold's state overwrites instead of writing new files (not part of
# any version: a crash or a rejection may leave it consumed or half overwritten).
SPARE_STATE = ".spare"
ALWAYS_ON_GATES = ("complete", "parses", "matches-base", "finite")
DIGEST_PLACEHOLDER = "sha256:" + "0" * 64  # as long as a real digest, so the header keeps its length
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


Folded = tuple[dict[str, torch.Tensor], torch.Tensor | None]  # a tensor's new state, and its merged value if due


@dataclass(frozen=True)
class FoldResult:
    status: Literal["merged", "duplicate", "rejected"]
    stream: str
    version: int | None
    output: Path | None
    digest: str | None  # the checkpoint's
    reason: str | None = None
    gate: str | None = None
    output_digest: str | None = None
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "stream": self.stream, "version": self.version,
                "output": str(self.output) if self.output else None, "digest": self.digest,
                "reason": self.reason, "gate": self.gate, "output_digest": self.output_digest,
                "notes": list(self.notes)}


def version_dir(root: Path, version: int) -> Path:
    return root / f"v{version:04d}"


def fold_checkpoint(policy: Policy, stream_name: str | None, checkpoint: str | os.PathLike[str], *,
                    metrics_file: Path | None = None, source: str | None = None,
                    progress: Callable[[int], None] | None = None, allow_protected: bool = False,
                    ledger: Ledger | None = None) -> FoldResult:
    """Fold ``checkpoint`` into the stream. Rejections are recorded and returned, never raised;
    problems with the policy or the stream's own files raise :class:`PolicyError`. ``allow_protected`` folds a
    MergeLock-protected checkpoint as the policy's ``allow_protected`` does (recorded with the version).
    ``ledger``: the policy's ledger, open for writing (without one, it is opened, and its writer lock taken, for
    this call)."""
    stream = policy.stream(stream_name)
    if not Path(checkpoint).exists():
        raise UsageError(f"{checkpoint} does not exist; give the path of a checkpoint's model folder.")
    if allow_protected:
        stream = dataclasses.replace(stream, gate=dataclasses.replace(stream.gate, allow_protected=True))
    try:
        with writing(policy, ledger, role="fold") as writer:
            return _fold_into(policy, stream, writer, Path(checkpoint), metrics_file, source, progress)
    except Exception as exc:  # a full disk anywhere: the version folders are gone, the ledger unchanged
        if disk_full(exc):
            where = getattr(exc, "filename", None) or policy.home
            raise no_space(Path(where).parent if Path(where).suffix else where, _space_needed(stream)) from exc
        raise


def _space_needed(stream: StreamConfig) -> int | None:
    """About what a fold writes: one version (the base's size in the output dtype) and a float32 state of up to
    two tensors per floating tensor."""
    try:
        with ModelFolder.open(stream.base) as base:
            return sum(info.numel * (_output_dtype(stream, info.dtype).itemsize + 8) for info in base.tensors.values())
    except (ModelFolderError, TypeError, OSError):
        return None


def _fold_into(policy: Policy, stream: StreamConfig, ledger: Ledger, path: Path, metrics_file: Path | None,
               source: str | None, progress: Callable[[int], None] | None) -> FoldResult:
    described = {"source": source or str(path.resolve()), "arrived": utc_now()}
    try:
        folder = ModelFolder.open(path)
    except ModelFolderError as exc:
        return record_rejection(ledger, stream, described, "validation", str(exc))
    # The checkpoint is hashed on a worker thread while it is folded; a duplicate is noticed as soon as its
    # digest is known, and what was written for it is thrown away.
    with folder, BackgroundDigest(path) as pending, quick_gil_handoff():
        described |= {"size": sum(t.nbytes for t in folder.tensors.values()),
                      "parameters": sum(t.numel for t in folder.tensors.values()),
                      "dtypes": _dtype_counts(folder)}
        try:
            with _open_base(stream) as base, ExitStack() as stack:
                fold = _Fold(policy, stream, ledger, folder, described, pending, base, stack, progress)
                return fold.run(metrics_file)
        except _AlreadyFolded as known:
            return known.result
        except RejectedError as rejection:
            return _rejected_unless_duplicate(ledger, stream, described, pending, _weights_files(folder), progress,
                                              rejection)


def _rejected_unless_duplicate(ledger: Ledger, stream: StreamConfig, described: dict[str, Any],
                               pending: BackgroundDigest, weights_files: list[str],
                               progress: Callable[[int], None] | None, rejection: RejectedError) -> FoldResult:
    """Record the rejection, unless the checkpoint was folded before: a duplicate is reported as one."""
    try:
        _digest_or_duplicate(ledger, stream, described, pending, weights_files, progress)
    except _AlreadyFolded as known:
        return known.result
    except RejectedError as unreadable:
        rejection = unreadable
    return record_rejection(ledger, stream, described, rejection.gate, str(rejection))


class _AlreadyFolded(Exception):
    def __init__(self, result: FoldResult) -> None:
        self.result = result


def _digest_or_duplicate(ledger: Ledger, stream: StreamConfig, described: dict[str, Any], pending: BackgroundDigest,
                         weights_files: list[str], progress: Callable[[int], None] | None) -> str:
    """The checkpoint's digest (stored in ``described``); raises _AlreadyFolded if the stream has it."""
    if "digest" not in described:
        try:
            described["digest"] = pending.result(tick=_ticker(progress))
        except ModelFolderError as exc:
            raise RejectedError(str(exc), gate="validation") from exc
        described["weights_digest"] = pending.weights_digest(weights_files)
        previous = ledger.version_with_checkpoint(stream.name, described["digest"], described["weights_digest"])
        if previous is not None:
            same = "" if previous.checkpoint == described["digest"] else " (the same weights)"
            raise _AlreadyFolded(FoldResult("duplicate", stream.name, previous.version, Path(previous.output),
                                            described["digest"],
                                            f"already folded into version {previous.version}{same}"))
    return described["digest"]


def _weights_files(folder: ModelFolder) -> list[str]:
    return [*folder.headers, *([INDEX_FILE] if folder.index is not None else [])]


def _dtype_counts(folder: ModelFolder) -> dict[str, int]:
    counts: dict[str, int] = {}
    for info in folder.tensors.values():
        counts[info.entry.dtype] = counts.get(info.entry.dtype, 0) + 1
    return counts


def record_rejection(ledger: Ledger, stream: StreamConfig, described: dict[str, Any], gate: str,
                     reason: str) -> FoldResult:
    """Record that a checkpoint (``described``: at least its source) was rejected, and say so."""
    ledger.record_rejection(stream.name, CheckpointFacts.from_payload(described), gate, reason)
    return FoldResult("rejected", stream.name, None, None, described.get("digest"), reason, gate)


def _open_base(stream: StreamConfig) -> ModelFolder:
    if isinstance(stream.base, str):
        raise PolicyError(f"stream {stream.name!r}: base {stream.base!r} is on the Hub; Hub bases are not "
                          "supported yet, point base at a local model folder.")
    if not stream.base.is_dir():
        raise PolicyError(f"stream {stream.name!r}: base folder {stream.base} does not exist; fix "
                          f"[streams.{stream.name}].base in the policy.")
    try:
        return ModelFolder.open(stream.base)
    except ModelFolderError as exc:
        raise PolicyError(f"stream {stream.name!r}: the base model is unusable: {exc}") from exc


class _Fold:
    """One fold in progress: what it reads, what it writes, and the phases it goes through."""

    def __init__(self, policy: Policy, stream: StreamConfig, ledger: Ledger, folder: ModelFolder,
                 described: dict[str, Any], pending_digest: BackgroundDigest, base: ModelFolder, stack: ExitStack,
                 progress: Callable[[int], None] | None) -> None:
        self.policy, self.stream, self.ledger, self.folder, self.base = policy, stream, ledger, folder, base
        self.described, self.pending_digest, self.progress = described, pending_digest, progress
        self.head = ledger.head(stream.name)
        self.version = self.head.version + 1 if self.head else 1
        self.stream_home = policy.home / "streams" / stream.name
        self.state_dir = version_dir(self.stream_home / "state", self.version)
        self.output_dir = version_dir(stream.output, self.version)
        self.old_state = stack.enter_context(ModelFolder.open(self.head.state)) if self.head else None
        scalars = _read_scalars(Path(self.head.state), stream) if self.head else {}
        self.method = method_class(stream.method)(stream.params, scalars)
        stack.callback(self.method.close)
        self.kinds = self.method.state_kinds()
        self.floating = [n for n, info in base.tensors.items() if info.dtype.is_floating_point]
        self.stream_row = ledger.stream_row(stream.name)
        self.card_hashes: dict[str, str] = {}  # README.md and provenance.json, written last
        self.zero_elements: dict[str, int] = {}  # per tensor, checkpoint elements in pieces that were all zeros
        self.base_digest = self.stream_row["base_digest"] if self.stream_row else folder_digest(base.path)

    def state_of(self, source: ModelFolder | None, name: str, start: int = 0,
                 stop: int | None = None) -> dict[str, torch.Tensor]:
        """The state of tensor ``name`` (elements [start, stop) only, flat, if given) in ``source``."""
        return {k: source.read(_state_name(k, name), start, stop) for k in self.kinds} if source else {}

    def digest(self) -> str:
        """The checkpoint's digest, waiting for it if need be; a checkpoint already folded ends the fold."""
        return _digest_or_duplicate(self.ledger, self.stream, self.described, self.pending_digest,
                                    _weights_files(self.folder), self.progress)

    def run(self, metrics_file: Path | None) -> FoldResult:
        progress = self.progress
        problems = problems_against_base(self.folder, self.base)
        if problems:
            raise RejectedError(problems[0].message)
        config = self.stream.gate
        self.gates = [*ALWAYS_ON_GATES, *self._protection_gate(config.allow_protected),
                      *gate.before_fold(config, self.folder.path)]
        # ‖τ‖² per tensor, summed exactly at the end (math.fsum): the same whatever order tensors finish in
        self.update_sq: dict[str, float] | None = {} if config.max_update_ratio is not None else None
        if config.max_update_ratio is not None:
            self.gates.append("max_update_ratio")
        if config.eval is not None:
            self.gates.append("eval")  # a version is committed only once its eval passed
        _remove_uncommitted(self.stream.output, self.version)
        _remove_uncommitted(self.stream_home / "state", self.version)
        if self.head is not None:  # a crash after recording may have left `latest` one step behind
            _point_latest(self.stream.output, Path(self.head.output))
        self.metrics = load_metrics(self.folder.path, metrics_file)
        missing = [m for m in self.method.metrics_needed() if m not in self.metrics]
        if missing and config.eval is not None:  # the eval gate measures what training did not record
            self.metrics |= gate.evaluate(config, self.folder.path, check_minimums=False, tick=_ticker(progress))
        self.method.begin(Arrival(self.folder, self.digest, t=self.version, metrics=self.metrics,
                                  history=self.ledger.history(self.stream.name)))
        while self.method.survey_needed():
            for name in self.floating:
                if progress:
                    progress(0)  # lets the daemon ping its watchdog and stop between tensors
                self.method.survey(name, self.base.read(name).float(), self.folder.read(name).float(),
                                   self.state_of(self.old_state, name))
        try:
            output_writer = self._fold_pass(progress)
            if output_writer is None:  # the merged tensors needed a model-wide quantity: a second pass
                output_writer = self._merge_pass(progress)
            self.eval_metrics: dict[str, float] = {}
            if config.eval is not None:
                self.eval_metrics = gate.evaluate(config, self.output_dir, tick=_ticker(progress))
        except BaseException:  # a rejection, a duplicate or a crash: no version folder it wrote may stay
            _remove_uncommitted(self.stream.output, self.version)
            _remove_uncommitted(self.stream_home / "state", self.version)
            raise
        return self._commit(output_writer)

    def _protection_gate(self, allowed: bool) -> list[str]:
        """A MergeLock-protected checkpoint would break the merge by design: rejected unless explicitly allowed
        (then recorded with the checkpoint)."""
        marks = protection_marks(self.folder)
        if marks is None:
            return []
        if not allowed:
            raise RejectedError(f"{self.folder.path} is protected by MergeLock ({marks['scheme']} version "
                                f"{marks.get('version', '?')}), so merging it would break the merged model; ask its "
                                "owner for the unprotected weights.", gate="mergelock")
        self.described["mergelock"] = {"scheme": marks["scheme"], "version": marks.get("version"),
                                       "strength": marks.get("strength"), "allowed": True}
        return ["mergelock-allowed"]

    def _metadata(self, checkpoint_digest: str) -> dict[str, str]:
        parent = self.head.output_digest if self.head else self.base_digest
        return {"mergeops.stream": self.stream.name, "mergeops.version": str(self.version),
                "mergeops.method": self.stream.method,
                "mergeops.parents": json.dumps([parent, checkpoint_digest]),
                "mergeops.tool": f"mergeops {__version__}"}

    def _output_writer(self) -> ModelWriter:
        """The merged model's writer; until the checkpoint's digest is known its header holds a placeholder."""
        known = "digest" in self.described or self.pending_digest.done()
        specs = [TensorSpec(n, _output_dtype(self.stream, info.dtype), info.shape)
                 for n, info in self.base.tensors.items()]
        writer = ModelWriter(self.output_dir, specs, metadata=self._metadata(self.digest() if known else
                                                                            DIGEST_PLACEHOLDER),
                             donor=self.base.path, provisional_metadata=not known)
        def cards(hashes: dict[str, str]) -> dict[str, bytes]:
            files = card_files(self._facts(), digest_of_listing(hashes), self.ledger.key)
            self.card_hashes = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
            return files

        writer.finalize = cards
        return writer

    def _settle(self, output: ModelWriter, wait: bool) -> None:
        """Give the output its final metadata once the checkpoint's digest is known (``wait``: now)."""
        if output.metadata_is_provisional and (wait or self.pending_digest.done()):
            output.settle_metadata(self._metadata(self.digest()))

    def _facts(self) -> VersionFacts:
        return _facts(self.policy, self.stream, self.ledger, self.base, self.head, self.base_digest,
                      self.described, self.version, tuple(self.gates))

    def _fold_pass(self, progress: Callable[[int], None] | None) -> ModelWriter | None:
        """Fold every tensor into new state; write merged tensors too when the method can right away."""
        output = None if self.method.needs_global else self._output_writer()
        order = output.layout_order if output else list(self.base.tensors)
        # The state follows the output's order with one file per kind: pieces of all kinds of a tensor are
        # written at once, and every file still grows front to back (so it is hashed as it is written).
        state_specs = [TensorSpec(_state_name(kind, n), torch.float32, self.base.tensors[n].shape)
                       for kind in self.kinds for n in order if n in self.floating]
        with ModelWriter(self.state_dir, state_specs, metadata={"mergeops.stream": self.stream.name},
                         shard_group=lambda spec: spec.name.split(STATE_SEPARATOR, 1)[0],
                         recycle=self.state_dir.parent / SPARE_STATE) as state, \
                output or nullcontext(), \
                closing(self._prepared([n for n in order if n in self.floating])) as prepared:
            for name in order:
                if progress:
                    progress(self.folder.tensors[name].nbytes)
                if name not in self.floating:
                    base = self.base.read(name)
                    self._check_integer(name, self.folder.read(name), base)
                    if output:
                        output.write(name, base)
                    continue
                prepared_name, extra = next(prepared)
                assert prepared_name == name, "tensors are prepared in the order they are written"
                if self.method.folds_in_pieces(name, self.base.tensors[name].shape):
                    self._fold_pieces(name, extra, state, output)
                else:
                    new_state, merged = self._fold_whole(name, extra)
                    for kind, value in new_state.items():
                        state.write(_state_name(kind, name), value)
                    if output:
                        output.write(name, merged)
                del extra  # a projection's factor is not kept while the next one is awaited
                if output:
                    self._settle(output, wait=False)
            self._check_written()
            self.digest()  # a duplicate must stop the fold before its state is kept
            if output:
                self._settle(output, wait=True)
            if self.update_sq is not None:  # before anything is committed: a rejection leaves no trace
                accepted = self.ledger.update_norms(self.stream.name)
                gate.check_update(self.stream.gate, self.update_norm, accepted)
            self.method.finish()
            state.extra_files[SCALARS_FILE] = _scalars_json(self.stream, self.method)
        self.state_hashes = state.file_hashes
        return output

    def _prepared(self, names: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        """What each tensor's fold needs beyond its inputs (``MergeMethod.prepare``), in order. Long preparations
        (OPCM's projections) are computed ahead on two threads, one torch thread each, while the fold goes on;
        those in flight stay within the two largest preparations' memory."""
        ahead = [n for n in names if self.method.prepares_ahead(n, self.base.tensors[n].shape)]
        ahead_names = set(ahead)
        sizes = sorted((self.base.tensors[n].numel for n in ahead), reverse=True)
        computed = map_ahead(self._prepare, ahead, workers=2, budget=sum(sizes[:2]),
                             weight=lambda name: self.base.tensors[name].numel)
        # a torch thread per tensor, not per operation, while two are prepared at once
        with one_torch_thread() if ahead else nullcontext(), closing(computed):  # workers stop before threads reset
            for name in names:
                yield next(computed) if name in ahead_names else (name, self._prepare(name))

    def _prepare(self, name: str) -> dict[str, Any]:
        state = {k: self.old_state.stored(_state_name(k, name)) for k in self.kinds} if self.old_state else {}
        return self.method.prepare(name, self.base.stored(name), self.folder.stored(name), state)

    def _fold_whole(self, name: str, extra: dict[str, Any]) -> Folded:
        """Fold one tensor at once: its new state, and its merged value when the output is written now."""
        new, base = self._checked_float(name, self.folder.read(name)), self.base.read(name).float()
        self._add_update(name, new, base)
        new_state = self.method.fold(name, base, new, self.state_of(self.old_state, name), **_read_extra(extra))
        if self.method.needs_global:
            return new_state, None
        dtype = _output_dtype(self.stream, self.base.tensors[name].dtype)
        return new_state, _finite_merged(name, self.method.merged(name, base, new_state).to(dtype))

    def _fold_pieces(self, name: str, extra: dict[str, Any], state: ModelWriter, output: ModelWriter | None) -> None:
        """Fold one tensor in cache-sized pieces of whole rows, read from and written to disk piece by piece: memory
        for a few pieces, not the tensor, and one pass over it while it is in cache."""
        with one_torch_thread():  # pieces are too small to share out; the other core hashes what is written
            for start, stop in piece_bounds(self.base.tensors[name].shape):
                new = self._checked_float(name, self.folder.read(name, start, stop))
                base = self.base.read(name, start, stop).float()
                self._add_update(name, new, base)
                new_state = self.method.fold(name, base, new, self.state_of(self.old_state, name, start, stop),
                                             **_read_extra(extra, start, stop))
                for kind, value in new_state.items():
                    state.write_piece(_state_name(kind, name), start, value)
                if output:
                    merged = self.method.merged(name, base, new_state).to(output.specs[name].dtype)
                    output.write_piece(name, start, _finite_merged(name, merged))

    def _checked_float(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """``values`` (part or all of the checkpoint's tensor ``name``) in float32, refused if not finite there: a
        finite float64 value beyond float32's range is as unmergeable as a NaN."""
        converted = values.float()
        total = float(converted.sum())
        if total == 0.0 and not bool(converted.any()):
            self.zero_elements[name] = self.zero_elements.get(name, 0) + converted.numel()
        if not math.isfinite(total):  # cheap; the exact check (and its message) only if needed
            problem = tensor_value_problem(name, self.folder.read(name), self.folder.tensors[name].file)
            if problem:
                raise RejectedError(problem.message, gate="finite")
            if not bool(torch.isfinite(converted).all()):
                raise RejectedError(f"tensor {name!r} of {self.folder.path} has values beyond float32's range "
                                    f"(largest magnitude {float(values.abs().max()):.3g}) and merging computes in "
                                    "float32, so it cannot be merged; the checkpoint is corrupted or was saved "
                                    "wrongly.", gate="finite")
        return converted

    def _check_written(self) -> None:
        """A tensor that is all zeros where the base's is not was never written: a weights file preallocated to its
        full length looks complete before its bytes arrive."""
        for name, zeros in self.zero_elements.items():
            shape = self.base.tensors[name].shape
            if zeros == self.base.tensors[name].numel and any(
                    bool(self.base.read(name, start, stop).any()) for start, stop in piece_bounds(shape)):
                raise RejectedError(f"tensor {name!r} of {self.folder.path} is all zeros where the base's is not: the "
                                    "weights look preallocated and not yet written; wait until the producer has "
                                    "finished (a completion `marker` in the watch table makes the daemon wait for it).")

    def _add_update(self, name: str, new: torch.Tensor, base: torch.Tensor) -> None:
        if self.update_sq is not None:  # a tensor's pieces come in order on one thread
            self.update_sq[name] = self.update_sq.get(name, 0.0) + float((new - base).square().sum(dtype=torch.float64))

    @property
    def update_norm(self) -> float | None:
        return math.sqrt(math.fsum(self.update_sq.values())) if self.update_sq is not None else None

    def _check_integer(self, name: str, new: torch.Tensor, base: torch.Tensor) -> None:
        problem = tensor_value_problem(name, new, self.folder.tensors[name].file, expect_floating=False)
        if problem:
            raise RejectedError(problem.message)
        if not torch.equal(new, base):
            raise RejectedError(f"integer tensor {name!r} differs from the base's; integer tensors (buffers, ids) "
                                "must be identical in every checkpoint.")

    def _merge_pass(self, progress: Callable[[int], None] | None) -> ModelWriter:
        """Write the merged model from the new state, piece by piece (``merged`` is elementwise)."""
        with ModelFolder.open(self.state_dir) as state, self._output_writer() as writer, one_torch_thread():
            for name in writer.layout_order:
                if progress:
                    progress(0)
                if name not in self.floating:
                    writer.write(name, self.base.read(name))
                    continue
                for start, stop in piece_bounds(self.base.tensors[name].shape):
                    merged = self.method.merged(name, self.base.read(name, start, stop).float(),
                                                self.state_of(state, name, start, stop))
                    writer.write_piece(name, start, _finite_merged(name, merged.to(writer.specs[name].dtype)))
        return writer

    def _commit(self, output: ModelWriter) -> FoldResult:
        """Point ``latest`` at the new version, record it (and what it prunes) in one transaction, prune."""
        stream, version = self.stream, self.version
        output_digest = digest_of_listing(output.file_hashes)
        events: list[LedgerEvent] = []
        if self.stream_row is None:
            events.append(StreamStarted(stream.name, str(stream.base), self.base_digest, stream.method, stream.params))
        events.append(VersionCommitted(
            stream.name, version, stream.method, stream.params, self.head.version if self.head else None,
            CheckpointFacts.from_payload(self.described | {"metrics": self.metrics}), output_digest,
            self.ledger.relative(self.output_dir), output.file_hashes, self.ledger.relative(self.state_dir),
            digest_of_listing(self.state_hashes), tuple(self.gates), self.policy.digest, f"mergeops {__version__}",
            update_norm=self.update_norm, cards=self.card_hashes, eval=self.eval_metrics))
        events += [VersionPruned(stream.name, v.version)
                   for v in self.ledger.versions(stream.name) if not v.pruned and v.version <= version - stream.keep]
        self.ledger.record(*events)
        _point_latest(stream.output, self.output_dir)  # only once the ledger knows the version
        _prune(stream, self.stream_home / "state", version)
        return FoldResult("merged", stream.name, version, self.output_dir, self.described["digest"],
                          output_digest=output_digest, notes=tuple(self.method.notes))


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


def _read_extra(extra: dict[str, Any], start: int = 0, stop: int | None = None) -> dict[str, Any]:
    """A tensor's prepared extras for ``fold``: whatever can be read, read (elements [start, stop)) in float32."""
    return {key: value.read(start, stop).float() if isinstance(value, Pieces) else value
            for key, value in extra.items()}


def _state_name(kind: str, name: str) -> str:
    return f"{kind}{STATE_SEPARATOR}{name}"


def _facts(policy: Policy, stream: StreamConfig, ledger: Ledger, base: ModelFolder, head: VersionRecord | None,
           base_digest: str, described: dict[str, Any], version: int, gates: tuple[str, ...]) -> VersionFacts:
    inputs = [Input("base", base_digest, str(base.path))]
    if head is not None:
        inputs.append(Input("previous", head.output_digest, head.output))
    checkpoint = Input("checkpoint", described["digest"], described["source"])
    earlier = tuple(Input("checkpoint", v.checkpoint, v.source) for v in ledger.versions(stream.name))
    return VersionFacts(stream.name, version, stream.method, stream.params, (*inputs, checkpoint),
                        (*earlier, checkpoint), policy.digest, described["arrived"], read_license(base.path),
                        gates=gates)


def _ticker(progress: Callable[[int], None] | None) -> Callable[[], None] | None:
    """The progress callback as a tick for long waits (it pings the daemon's watchdog and checks for stop)."""
    return (lambda: progress(0)) if progress is not None else None


def _output_dtype(stream: StreamConfig, stored: torch.dtype) -> torch.dtype:
    if stream.dtype == "base" or not stored.is_floating_point:
        return stored
    return _DTYPES[stream.dtype]


def _scalars_json(stream: StreamConfig, method: MergeMethod) -> bytes:
    document = {"method": stream.method, "params": stream.params, "scalars": method.scalars}
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def _read_scalars(state_dir: Path, stream: StreamConfig) -> dict[str, Any]:
    document = json.loads((state_dir / SCALARS_FILE).read_text())
    if document["method"] != stream.method or document["params"] != stream.params:
        raise PolicyError(
            f"stream {stream.name!r} was built with method {document['method']} {document['params']}, but the "
            f"policy now says {stream.method} {stream.params}; a running merge cannot change method or "
            "parameters: revert the policy, or start a new stream with its own output folder.")
    return document["scalars"]


def _remove_uncommitted(root: Path, next_version: int) -> None:
    """Remove version folders at or past ``next_version`` and temp folders: leftovers of a crash."""
    if not root.is_dir():
        return
    leftovers = [child for child in root.iterdir() if child.name.startswith(".") and TEMP_MARKER in child.name]
    leftovers += [folder for version, folder in _version_dirs(root) if version >= next_version]
    for child in leftovers:
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def _point_latest(root: Path, target: Path) -> None:
    link = root / "latest"
    tmp = root / f".latest{TEMP_MARKER}{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target.name)
    os.replace(tmp, link)


def _prune(stream: StreamConfig, state_root: Path, head: int) -> None:
    """Keep the newest ``keep`` versions on disk, and only the head's state; the state before it becomes the spare.
    Outputs are removed, never recycled: a server may still have a pruned version's weights mapped."""
    for version, folder in _version_dirs(stream.output):
        if version <= head - stream.keep:
            shutil.rmtree(folder)
    spare = state_root / SPARE_STATE
    for version, folder in _version_dirs(state_root):
        if version == head - 1 and _cleared(spare):
            os.rename(folder, spare)
        elif version < head:
            shutil.rmtree(folder)


def _cleared(path: Path) -> bool:
    """Remove the folder ``path`` if it is there; whether it is gone (a spare that cannot be replaced only costs
    the next fold some time, and must not fail a fold that is already committed)."""
    shutil.rmtree(path, ignore_errors=True)
    return not os.path.lexists(path)


def _version_dirs(root: Path) -> list[tuple[int, Path]]:
    return sorted((int(match.group(1)), child) for child in root.iterdir()
                  if (match := _VERSION_DIR.match(child.name)))
