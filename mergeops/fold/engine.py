"""The fold: merge one checkpoint into a stream, one tensor at a time, and commit the result.

Per tensor the engine reads base, checkpoint and method state, hands them to the method in float32,
and writes the new state and the merged tensor straight to disk. Order of commit, each step atomic:
new state folder -> new version folder -> ``latest`` link -> record. A crash anywhere leaves the
record at the previous version; whatever was written past it is removed and redone on the next fold.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mergeops import __version__, keys
from mergeops.errors import ModelFolderError, PolicyError, RejectedError
from mergeops.fold.methods import method_class
from mergeops.fold.methods.base import Arrival, MergeMethod
from mergeops.fold.metrics import load_metrics
from mergeops.intake.validate import problems_against_base, tensor_value_problem
from mergeops.ledger.card import Input, VersionFacts, card_files, read_license
from mergeops.ledger.store import Ledger, VersionRecord, signing_key_path, utc_now
from mergeops.model import ModelFolder, ModelWriter, TensorSpec, folder_digest
from mergeops.model.digest import digest_of_listing
from mergeops.model.writer import TEMP_MARKER
from mergeops.policy import Policy, StreamConfig

STATE_SEPARATOR = "::"  # state tensor names are f"{kind}::{tensor name}"
SCALARS_FILE = "scalars.json"
_VERSION_DIR = re.compile(r"^v(\d{4,})$")
ALWAYS_ON_GATES = ("complete", "parses", "matches-base", "finite")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
                    progress: Callable[[int], None] | None = None) -> FoldResult:
    """Fold ``checkpoint`` into the stream. Rejections are recorded and returned, never raised;
    problems with the policy or the stream's own files raise :class:`PolicyError`."""
    stream = policy.stream(stream_name)
    key = keys.load_signing_key(signing_key_path(policy.keys))
    with Ledger.open(policy.home, key) as ledger:
        return _fold_into(policy, stream, ledger, Path(checkpoint), metrics_file, source, progress)


def _fold_into(policy: Policy, stream: StreamConfig, ledger: Ledger, path: Path, metrics_file: Path | None,
               source: str | None, progress: Callable[[int], None] | None) -> FoldResult:
    described = {"source": source or str(path.resolve()), "arrived": utc_now()}
    try:
        folder = ModelFolder.open(path)
    except ModelFolderError as exc:
        return _reject(ledger, stream, described, "validation", str(exc))
    with folder:
        described |= {"size": sum(t.nbytes for t in folder.tensors.values()),
                      "parameters": sum(t.numel for t in folder.tensors.values()),
                      "dtypes": _dtype_counts(folder)}
        try:
            described["digest"] = folder_digest(path)
        except ModelFolderError as exc:
            return _reject(ledger, stream, described, "validation", str(exc))
        previous = ledger.version_with_checkpoint(stream.name, described["digest"])
        if previous is not None:
            return FoldResult("duplicate", stream.name, previous.version, Path(previous.output), described["digest"],
                              f"already folded into version {previous.version}")
        try:
            version, output, output_digest, notes = _fold(policy, stream, ledger, folder, described, metrics_file,
                                                          progress)
        except RejectedError as exc:
            return _reject(ledger, stream, described, exc.gate, str(exc))
    return FoldResult("merged", stream.name, version, output, described["digest"], output_digest=output_digest,
                      notes=notes)


def _dtype_counts(folder: ModelFolder) -> dict[str, int]:
    counts: dict[str, int] = {}
    for info in folder.tensors.values():
        counts[info.entry.dtype] = counts.get(info.entry.dtype, 0) + 1
    return counts


def _reject(ledger: Ledger, stream: StreamConfig, described: dict[str, Any], gate: str, reason: str) -> FoldResult:
    ledger.record(("checkpoint.rejected", {"stream": stream.name, "checkpoint": described, "gate": gate,
                                           "reason": reason}))
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


def _fold(policy: Policy, stream: StreamConfig, ledger: Ledger, folder: ModelFolder, described: dict[str, Any],
          metrics_file: Path | None, progress: Callable[[int], None] | None
          ) -> tuple[int, Path, str, tuple[str, ...]]:
    digest = described["digest"]
    with _open_base(stream) as base, ExitStack() as stack:
        problems = problems_against_base(folder, base)
        if problems:
            raise RejectedError(problems[0].message)
        head = ledger.head(stream.name)
        stream_home = policy.home / "streams" / stream.name
        version = head.version + 1 if head else 1
        _remove_uncommitted(stream.output, version)
        _remove_uncommitted(stream_home / "state", version)

        scalars: dict[str, Any] = {}
        old_state: ModelFolder | None = None
        if head is not None:
            old_state = stack.enter_context(ModelFolder.open(head.state))
            scalars = _read_scalars(Path(head.state), stream)
        method = method_class(stream.method)(stream.params, scalars)
        stack.callback(method.close)
        metrics = load_metrics(folder.path, metrics_file)
        arrival = Arrival(folder, digest, t=(head.version if head else 0) + 1, metrics=metrics,
                          history=ledger.history(stream.name))
        method.begin(arrival)

        floating = [n for n, info in base.tensors.items() if info.dtype.is_floating_point]
        while method.survey_needed():
            for name, b, new, state in _inputs(base, folder, old_state, method, floating):
                method.survey(name, b, new, state)

        kinds = method.state_kinds()
        state_specs = [TensorSpec(f"{kind}{STATE_SEPARATOR}{n}", torch.float32, base.tensors[n].shape)
                       for n in floating for kind in kinds]
        state_dir = version_dir(stream_home / "state", version)
        output_dir = version_dir(stream.output, version)
        stream_row = ledger.stream_row(stream.name)
        base_digest = stream_row["base_digest"] if stream_row else folder_digest(base.path)
        parent = head.output_digest if head else base_digest
        metadata = {"mergeops.stream": stream.name, "mergeops.version": str(version),
                    "mergeops.method": stream.method, "mergeops.parents": json.dumps([parent, digest]),
                    "mergeops.tool": f"mergeops {__version__}"}
        output_specs = [TensorSpec(n, _output_dtype(stream, info.dtype), info.shape)
                        for n, info in base.tensors.items()]

        with ModelWriter(state_dir, state_specs, metadata={"mergeops.stream": stream.name}) as state_writer, \
                ExitStack() as single_pass:
            facts = _facts(policy, stream, ledger, base, head, base_digest, described, version)
            output_writer = None if method.needs_global else single_pass.enter_context(
                _output_writer(output_dir, output_specs, metadata, base.path, facts))
            order = output_writer.layout_order if output_writer else list(base.tensors)
            for name in order:
                new_raw = folder.read(name)
                if progress:
                    progress(new_raw.numel() * new_raw.element_size())
                b = base.read(name)
                if name not in floating:
                    problem = tensor_value_problem(name, new_raw, folder.tensors[name].file, expect_floating=False)
                    if problem:
                        raise RejectedError(problem.message)
                    if not torch.equal(new_raw, b):
                        raise RejectedError(f"integer tensor {name!r} differs from the base's; integer tensors "
                                            "(buffers, ids) must be identical in every checkpoint.")
                    if output_writer:
                        output_writer.write(name, b)
                    continue
                new = new_raw.float()
                if not math.isfinite(float(new.sum())):  # cheap; exact check (and its message) only if needed
                    problem = tensor_value_problem(name, new_raw, folder.tensors[name].file)
                    if problem:
                        raise RejectedError(problem.message)
                b32 = b.float()
                state = {k: old_state.read(f"{k}{STATE_SEPARATOR}{name}") for k in kinds} if old_state else {}
                new_state = method.fold(name, b32, new, state)
                for kind in kinds:
                    state_writer.write(f"{kind}{STATE_SEPARATOR}{name}", new_state[kind])
                if output_writer:
                    output_writer.write(name, method.merged(name, b32, new_state).to(output_writer.specs[name].dtype))
            method.finish()
            state_writer.extra_files[SCALARS_FILE] = _scalars_json(stream, method)
        state_hashes = state_writer.file_hashes
        if output_writer is None:
            output_writer = _write_merged(base, state_dir, method,
                                          _output_writer(output_dir, output_specs, metadata, base.path, facts), kinds)

    output_digest = digest_of_listing(output_writer.file_hashes)
    _point_latest(stream.output, output_dir)
    events: list[tuple[str, dict[str, Any]]] = []
    if stream_row is None:
        events.append(("stream.started", {"stream": stream.name, "base": str(stream.base), "base_digest": base_digest,
                                          "method": stream.method, "params": stream.params}))
    events.append(("version.committed", {
        "stream": stream.name, "version": version, "method": stream.method, "params": stream.params,
        "previous": head.version if head else None, "checkpoint": described | {"metrics": metrics},
        "output_digest": output_digest, "path": str(output_dir), "files": output_writer.file_hashes,
        "state_path": str(state_dir), "state_digest": digest_of_listing(state_hashes),
        "gates": list(facts.gates), "policy_digest": policy.digest, "tool": f"mergeops {__version__}"}))
    prunable = [v.version for v in ledger.versions(stream.name) if not v.pruned and v.version <= version - stream.keep]
    events += [("version.pruned", {"stream": stream.name, "version": n}) for n in prunable]
    ledger.record(*events)
    _prune(stream, stream_home / "state", version)
    return version, output_dir, output_digest, tuple(method.notes)


def _facts(policy: Policy, stream: StreamConfig, ledger: Ledger, base: ModelFolder, head: VersionRecord | None,
           base_digest: str, described: dict[str, Any], version: int) -> VersionFacts:
    inputs = [Input("base", base_digest, str(base.path))]
    if head is not None:
        inputs.append(Input("previous", head.output_digest, head.output))
    checkpoint = Input("checkpoint", described["digest"], described["source"])
    earlier = tuple(Input("checkpoint", v.checkpoint, v.source) for v in ledger.versions(stream.name))
    return VersionFacts(stream.name, version, stream.method, stream.params, (*inputs, checkpoint),
                        (*earlier, checkpoint), policy.digest, described["arrived"], read_license(base.path),
                        gates=ALWAYS_ON_GATES)


def _output_writer(output_dir: Path, specs: list[TensorSpec], metadata: dict[str, str], donor: Path,
                   facts: VersionFacts) -> ModelWriter:
    writer = ModelWriter(output_dir, specs, metadata=metadata, donor=donor)
    writer.finalize = lambda hashes: card_files(facts, digest_of_listing(hashes))
    return writer


def _write_merged(base: ModelFolder, state_dir: Path, method: MergeMethod, writer: ModelWriter,
                  kinds: tuple[str, ...]) -> ModelWriter:
    """Second pass for methods whose merged tensors need a model-wide quantity from the fold."""
    with ModelFolder.open(state_dir) as state, writer:
        for name in writer.layout_order:
            b = base.read(name)
            if not b.dtype.is_floating_point:
                writer.write(name, b)
                continue
            tensors = {k: state.read(f"{k}{STATE_SEPARATOR}{name}") for k in kinds}
            writer.write(name, method.merged(name, b.float(), tensors).to(writer.specs[name].dtype))
    return writer


def _inputs(base: ModelFolder, folder: ModelFolder, state: ModelFolder | None, method: MergeMethod,
            names: list[str]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
    kinds = method.state_kinds()
    for name in names:
        old = {k: state.read(f"{k}{STATE_SEPARATOR}{name}") for k in kinds} if state else {}
        yield name, base.read(name).float(), folder.read(name).float(), old


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
    for child in root.iterdir():
        match = _VERSION_DIR.match(child.name)
        is_temp = child.name.startswith(".") and TEMP_MARKER in child.name
        if is_temp or (match and int(match.group(1)) >= next_version):
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def _point_latest(root: Path, target: Path) -> None:
    link = root / "latest"
    tmp = root / f".latest{TEMP_MARKER}{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target.name)
    os.replace(tmp, link)


def _prune(stream: StreamConfig, state_root: Path, head: int) -> None:
    """Keep the newest ``keep`` versions on disk, and only the head's state."""
    for root, keep in ((stream.output, stream.keep), (state_root, 1)):
        for child in root.iterdir():
            match = _VERSION_DIR.match(child.name)
            if match and int(match.group(1)) <= head - keep:
                shutil.rmtree(child)
