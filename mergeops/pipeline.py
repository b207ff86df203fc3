"""One checkpoint's way into a stream: intake → gates → fold → commit.

:func:`fold_checkpoint` is the whole path, each stage in its own package: ``intake`` opens, describes, hashes and
checks the checkpoint against the base; ``gate`` checks it against the policy, before the fold (on the checkpoint)
and after it (on the candidate); ``fold`` streams it through the merge method into new state and a merged folder;
``commit`` writes the cards, records the version in the ledger, points ``latest`` at it and prunes. A rejection is
recorded and returned, never raised; nothing a rejected or crashed fold wrote stays on disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mergeops import __version__, gate
from mergeops.commit.commit import Committed, NextVersion, commit, next_version
from mergeops.commit.folders import StreamFolders
from mergeops.errors import (
    DiskFullError,
    ModelFolderError,
    PolicyError,
    RejectedError,
    UsageError,
    disk_full,
    full_disk_path,
    no_space,
)
from mergeops.fold.engine import Folded, FoldJob, fold, output_dtype, read_scalars
from mergeops.fold.methods import method_class
from mergeops.fold.methods.base import Arrival, MergeMethod, PastCheckpoint
from mergeops.intake.checkpoint import Checkpoint, receive, reopen
from mergeops.intake.metrics import load_metrics
from mergeops.ledger.kinds import CheckpointFacts
from mergeops.ledger.store import Ledger, utc_now, writing
from mergeops.model import ModelFolder, folder_digest
from mergeops.model.finetune import FineTune
from mergeops.policy import Policy, StreamConfig
from mergeops.threads import quick_gil_handoff


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


def fold_checkpoint(policy: Policy, stream_name: str | None, checkpoint: str | os.PathLike[str], *,
                    metrics_file: Path | None = None, source: str | None = None,
                    progress: Callable[[int], None] | None = None, allow_protected: bool = False,
                    ledger: Ledger | None = None) -> FoldResult:
    """Fold ``checkpoint`` into the stream. Rejections are recorded and returned, never raised; problems with the
    policy or the stream's own files raise :class:`PolicyError`. ``allow_protected`` folds a MergeLock-protected
    checkpoint as the policy's ``allow_protected`` does (recorded with the version). ``progress`` is called with the
    bytes folded, and with 0 between tensors and during long waits (the daemon pings its watchdog there).
    ``ledger``: the process's open ledger; without one, the policy's is opened (taking the writer lock) for the
    call."""
    stream = policy.stream(stream_name)
    if not Path(checkpoint).exists():
        raise UsageError(f"{checkpoint} does not exist; give the path of a checkpoint's model folder.")
    if allow_protected:
        stream = dataclasses.replace(stream, gate=dataclasses.replace(stream.gate, allow_protected=True))
    facts = CheckpointFacts(source or str(Path(checkpoint).resolve()), utc_now())
    try:
        with writing(policy, ledger, role="fold") as writer:
            head = writer.head(stream.name)
            try:
                try:
                    arrived = receive(Path(checkpoint), facts)
                except RejectedError as rejection:
                    return _rejected(writer, stream, facts, rejection)
                with arrived, quick_gil_handoff():
                    return _Pipeline(policy, stream, writer, arrived, progress).run(metrics_file)
            except Exception as exc:
                if disk_full(exc):  # the disk may have filled before the version was recorded or after
                    raise _no_space(policy, stream, writer, head.version if head else 0, exc) from exc
                raise
    except Exception as exc:  # a full disk before the ledger was open: nothing was recorded
        if disk_full(exc):
            raise no_space(full_disk_path(exc, policy.home), _space_needed(stream)) from exc
        raise


def _no_space(policy: Policy, stream: StreamConfig, ledger: Ledger, head_before: int,
              exc: BaseException) -> DiskFullError:
    """The full-disk error, saying what the ledger shows: nothing committed (the version's folders are gone), or the
    version committed and which step after its record did not finish."""
    where = full_disk_path(exc, policy.home)
    try:
        head = ledger.head(stream.name)
    except Exception:  # the ledger cannot say: say so rather than guess
        return no_space(where, committed=f"whether stream {stream.name!r} committed a version could not be read "
                                         "from the ledger (`mergeops status` shows it)")
    if head is None or head.version <= head_before:
        return no_space(where, _space_needed(stream))
    folders = StreamFolders.of(policy.home, stream.name, stream.output)
    committed = f"version {head.version} of stream {stream.name!r} was committed"
    latest, name = folders.latest(), Path(head.output).name
    if latest != name:
        committed += f", but `latest` still points at {latest or 'nothing'} (the next fold points it at {name})"
    return no_space(where, committed=committed)


class _AlreadyFolded(Exception):
    def __init__(self, result: FoldResult) -> None:
        self.result = result


@dataclass
class _Pipeline:
    policy: Policy
    stream: StreamConfig
    ledger: Ledger
    checkpoint: Checkpoint
    progress: Callable[[int], None] | None

    def run(self, metrics_file: Path | None) -> FoldResult:
        try:
            with _open_base(self.stream) as base, ExitStack() as stack:
                return self._stages(base, stack, metrics_file)
        except _AlreadyFolded as known:
            return known.result
        except RejectedError as rejection:
            return self._rejected_unless_duplicate(rejection)

    def _rejected_unless_duplicate(self, rejection: RejectedError) -> FoldResult:
        """Record the rejection, unless the checkpoint was folded before: a duplicate is reported as one."""
        try:
            self.digest()
        except _AlreadyFolded as known:
            return known.result
        except RejectedError as unreadable:
            rejection = unreadable
        return _rejected(self.ledger, self.stream, self.checkpoint.facts(), rejection)

    def _stages(self, base: ModelFolder, stack: ExitStack, metrics_file: Path | None) -> FoldResult:
        plan = next_version(self.policy, self.stream, self.ledger)
        method = self._method(plan, stack)
        # intake
        view = self.checkpoint.check_against_base(base, self.stream.vocab, self._tick)
        # gates on what the checkpoint is, then on what it brings for the method
        gates = gate.gates_for(self.stream.gate, method)
        subject = gate.Subject(self.checkpoint.folder, base, {}, self._tick)
        try:
            passed = [*gate.ALWAYS_ON, *gate.run(gates, subject, "checkpoint")]
        finally:  # the marks of an allowed protected checkpoint are recorded, whatever a later gate decides
            self.checkpoint.mergelock = subject.mergelock
        subject.metrics = self.checkpoint.metrics = load_metrics(self.checkpoint.path, metrics_file)
        passed += gate.run(gates, subject, "inputs")
        started = self.ledger.started(self.stream.name)
        base_digest = started.base_digest if started else folder_digest(base.path)
        subject.accepted_norms = self.ledger.update_norms(self.stream.name)
        try:
            # fold, measuring ‖τ‖ where a gate compares it: with the stream's update history (max_update_ratio), or
            # with ‖θ0‖ while the stream has none (its first fold), which it then starts
            first = not subject.accepted_norms
            folded = self._fold(view, base_digest, method, plan, stack, measure_base=first,
                                measure_update=first or self.stream.gate.max_update_ratio is not None)
            # gates on the candidate
            subject.candidate, subject.update_norm = plan.output_dir, folded.update_norm
            subject.base_norm = folded.base_norm
            passed += gate.run(gates, subject, "candidate")
        except BaseException:  # a rejection, a duplicate or a crash: no version folder it wrote may stay
            plan.discard()
            raise
        # commit
        committed = commit(self.policy, self.ledger, plan, base_path=base.path, started=started,
                           base_digest=base_digest, checkpoint=self.checkpoint.facts(with_metrics=True),
                           output_files=folded.output_files, state_files=folded.state_files, gates=passed,
                           update_norm=folded.update_norm, eval_metrics=subject.eval_metrics)
        return self._merged(committed, method)

    def _method(self, plan: NextVersion, stack: ExitStack) -> MergeMethod:
        """The stream's method, holding what it remembered after the head version."""
        scalars = {}
        if plan.head is not None:
            document = read_scalars(Path(plan.head.state))
            if document["method"] != self.stream.method or document["params"] != self.stream.params:
                raise PolicyError(
                    f"stream {self.stream.name!r} was built with method {document['method']} {document['params']}, "
                    f"but the policy now says {self.stream.method} {self.stream.params}; a running merge cannot "
                    "change method or parameters: revert the policy, or start a new stream with its own output "
                    "folder.")
            scalars = document["scalars"]
        method = method_class(self.stream.method)(self.stream.params, scalars)
        stack.callback(method.close)
        return method

    def _fold(self, checkpoint: FineTune, base_digest: str, method: MergeMethod, plan: NextVersion,
              stack: ExitStack, *, measure_base: bool, measure_update: bool) -> Folded:
        history = tuple(PastCheckpoint(v.checkpoint, Path(v.source), v.metrics)
                        for v in self.ledger.versions(self.stream.name))
        method.begin(Arrival(checkpoint, self.digest, t=plan.number, metrics=self.checkpoint.metrics, history=history,
                             reopen=lambda path: reopen(path, checkpoint.base, self.stream.vocab)))
        old_state = stack.enter_context(ModelFolder.open(plan.head.state)) if plan.head else None
        return fold(FoldJob(
            stream=self.stream.name, base=checkpoint.base, checkpoint=checkpoint, old_state=old_state, method=method,
            output_dir=plan.output_dir, state_dir=plan.state_dir, dtype=self.stream.dtype,
            metadata=lambda digest: self._metadata(plan, base_digest, digest), digest=self.digest,
            digest_known=lambda: self.checkpoint.digest_known, spare_state=plan.folders.spare_state,
            measure_update=measure_update, measure_base=measure_base,
            progress=self.progress))

    def _metadata(self, plan: NextVersion, base_digest: str, checkpoint_digest: str) -> dict[str, str]:
        parent = plan.head.output_digest if plan.head else base_digest
        return {"mergeops.stream": self.stream.name, "mergeops.version": str(plan.number),
                "mergeops.method": self.stream.method, "mergeops.parents": json.dumps([parent, checkpoint_digest]),
                "mergeops.tool": f"mergeops {__version__}"}

    def digest(self) -> str:
        """The checkpoint's digest, waiting for it if need be; a checkpoint already folded ends the fold."""
        known = self.checkpoint.digests is not None
        digest = self.checkpoint.digest(self._tick)
        if not known:
            weights_digest = self.checkpoint.digests[1]
            previous = self.ledger.version_with_checkpoint(self.stream.name, digest, weights_digest)
            if previous is not None:
                same = "" if previous.checkpoint == digest else " (the same weights)"
                raise _AlreadyFolded(FoldResult("duplicate", self.stream.name, previous.version,
                                                Path(previous.output), digest,
                                                f"already folded into version {previous.version}{same}"))
        return digest

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress(0)  # pings the daemon's watchdog and checks for stop

    def _merged(self, committed: Committed, method: MergeMethod) -> FoldResult:
        return FoldResult("merged", self.stream.name, committed.version, committed.output,
                          self.checkpoint.digest(), output_digest=committed.output_digest,
                          notes=tuple(method.notes))


def _rejected(ledger: Ledger, stream: StreamConfig, facts: CheckpointFacts, rejection: RejectedError) -> FoldResult:
    ledger.record_rejection(stream.name, facts, rejection.gate, str(rejection))
    return FoldResult("rejected", stream.name, None, None, facts.digest, str(rejection), rejection.gate)


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


def _space_needed(stream: StreamConfig) -> int | None:
    """About what a fold writes: one version (the base's size in the output dtype) and a float32 state of up to
    two tensors per floating tensor."""
    try:
        with ModelFolder.open(stream.base) as base:
            return sum(info.numel * (output_dtype(stream.dtype, info.dtype).itemsize + 8)
                       for info in base.tensors.values())
    except (ModelFolderError, TypeError, OSError):
        return None
