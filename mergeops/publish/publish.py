"""`mergeops publish`: copy a version to the stream's publish targets, sign it, record it.

The copy is checked against the sha256 of every file recorded when the version was written (a
changed file is never published), assembled in a temporary folder, signed there in the OpenSSF
model-signing format, uploaded to the Hub as one commit (``hub``) and/or renamed into place as
``to/vNNNN`` (``to``); then one publication event per target is recorded. With ``protect = true`` the
copy is protected with MergeLock first (and the protection recorded), so what is signed and published
is the protected model. With ``as_adapter = {rank = R}`` (or ``publish(..., as_adapter=R)``) what is signed and
published is instead a PEFT LoRA adapter of the version against the stream's base (``adapter.py``), as
``to/vNNNN-lora-rR``; the base must still be the one the stream started from (its digest is checked). An adapter
is added to the unprotected base, so it cannot be protected: ``protect`` with an adapter is refused.

The ``to`` folder must be this stream's (``commit.owner.claim``): nothing in a folder of another home or stream, or
one mergeops did not create, is touched. A ``to/vNNNN`` found there unrecorded is replaced only when it is the copy a
crash left between its rename and its record: the copy named, file by file, in the stream's ``publishing.json``
note, written before the rename.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeops import keys, untrusted
from mergeops.commit.card import public_name
from mergeops.commit.owner import NotOurFolder, Owner, claim
from mergeops.durable import copy_durably, fsync_dir, write_durably
from mergeops.errors import MergeopsError, UsageError, disk_full, full_disk_path, no_space
from mergeops.hub_uri import HubUri, is_hub
from mergeops.ledger.kinds import LedgerEvent, ProtectionRecorded, PublicationRecorded
from mergeops.ledger.store import Ledger, writing
from mergeops.model import folder_digest
from mergeops.model.digest import file_sha256
from mergeops.model.signing import sign_model_folder
from mergeops.model.writer import TEMP_MARKER
from mergeops.policy import MAX_ADAPTER_RANK, Policy, PublishConfig, StreamConfig
from mergeops.protect import protect
from mergeops.publish.adapter import AdapterReport, write_adapter
from mergeops.publish.hub import upload_to_hub


class AlreadyPublished(UsageError):
    """The version is published and recorded at that target already."""


@dataclass(frozen=True)
class Publication:
    stream: str
    version: int
    targets: tuple[str, ...]  # a local folder and/or hf://org/repo@sha
    output_digest: str
    signer: str | None
    adapter: AdapterReport | None = None  # published as a LoRA adapter: its rank and errors

    def to_json(self) -> dict[str, Any]:
        return {"stream": self.stream, "version": self.version, "targets": list(self.targets),
                "digest": self.output_digest, "signed_by": self.signer} | (
            {"adapter": self.adapter.to_json()} if self.adapter is not None else {})


def publish(policy: Policy, stream_name: str | None, version: int | None = None, *,
            ledger: Ledger | None = None, as_adapter: int | None = None) -> Publication:
    """Publish a version (default: the latest) to the stream's local folder and/or Hub repository. ``ledger``: the
    policy's ledger, open for writing (without one, it is opened, and its writer lock taken, for this call).
    ``as_adapter``: publish a LoRA adapter of this rank against the base, whatever the policy says."""
    stream = policy.stream(stream_name)
    if stream.publish is None:
        raise UsageError(f"stream {stream.name!r} has no [streams.{stream.name}.publish] table; add one with "
                         "`to = \"published/NAME\"` or `hub = \"org/repo\"`.")
    config = stream.publish
    if as_adapter is not None:
        if not 1 <= as_adapter <= MAX_ADAPTER_RANK:
            raise UsageError(f"an adapter's rank must be between 1 and {MAX_ADAPTER_RANK}, not {as_adapter}.")
        if config.protect:
            raise UsageError(f"stream {stream.name!r} publishes protected models (protect = true), and an adapter "
                             "cannot be protected: MergeLock protects a full model's weights, and an adapter is "
                             "added to the unprotected base; publish it without --as-adapter.")
        config = dataclasses.replace(config, as_adapter=as_adapter)
    with writing(policy, ledger, role="publish") as writer:
        published_before = _publications(writer, stream, version)
        try:
            return _publish(policy, stream, config, version, writer)
        except Exception as exc:
            if disk_full(exc):  # say what the ledger shows, not what the code meant to do
                recorded = _publications(writer, stream, version) - published_before
                raise no_space(full_disk_path(exc, policy.home), committed=(
                    f"stream {stream.name!r} was published and recorded at {', '.join(sorted(recorded))}"
                    if recorded else None)) from exc
            raise


def _publications(ledger: Ledger, stream: StreamConfig, version: int | None) -> set[str]:
    """The targets the ledger records for the version ``publish`` would publish."""
    record = ledger.version(stream.name, version) if version is not None else ledger.head(stream.name)
    return {p.target for p in ledger.publications(stream.name, record.version)} if record else set()


def _publish(policy: Policy, stream: StreamConfig, config: PublishConfig, version: int | None,
             ledger: Ledger) -> Publication:
    record = ledger.version(stream.name, version) if version is not None else ledger.head(stream.name)
    if record is None:
        which = f"version {version}" if version is not None else "any version"
        raise UsageError(f"stream {stream.name!r} has no {which} to publish.")
    if record.pruned:
        raise UsageError(f"{stream.name} version {record.version} was pruned (keep = {stream.keep}); publish a "
                         "retained version.")
    name = f"v{record.version:04d}" + (f"-lora-r{config.as_adapter}" if config.as_adapter is not None else "")
    target = config.to / name if config.to is not None else None
    if (to := config.to) is not None:  # before anything in it is removed: it must be this stream's
        claim(to, Owner(policy.home, stream.name, "publish", f"[streams.{stream.name}.publish].to"),
              lambda: _recorded_names(ledger, stream, to))
    staging_root = target.parent if target is not None else policy.home / "publishing"
    staging_root.mkdir(parents=True, exist_ok=True)
    for stale in staging_root.glob(f".{name}{TEMP_MARKER}*"):  # a crashed attempt's staging (the lock is ours)
        shutil.rmtree(stale, ignore_errors=True)
    note = policy.home / "streams" / stream.name / "publishing.json"
    if target is not None and (target.exists() or target.is_symlink()):
        if str(target) in {p.target for p in ledger.publications(stream.name, record.version)}:
            raise AlreadyPublished(f"{target} exists already: {stream.name} version {record.version} was "
                                   "published.")
        if not _left_by_crash(target, note):
            raise NotOurFolder(f"{target} is in the publish folder, but mergeops did not publish it there (the ledger "
                               "records no such publication); move it away and publish again; nothing in it was "
                               "touched.")
        # Renamed into place but never recorded: a crash between the two. Like an uncommitted fold, redo it.
        shutil.rmtree(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}{TEMP_MARKER}", dir=staging_root))
    targets = []
    try:
        _stage(Path(record.output), tmp / "copy", record.files, f"{stream.name} {name}")
        ready = tmp / "copy"
        protection, adapter = None, None
        if config.as_adapter is not None:
            adapter = write_adapter(ready, _stream_base(stream, ledger), tmp / "adapter", config.as_adapter,
                                    base_name=public_name(str(stream.base)), title=f"{stream.name} {name}")
            ready = tmp / "adapter"
        if config.protect:  # MergeLock before signing: the signature covers what is published
            if policy.keys.lock is None:
                raise UsageError(f"stream {stream.name!r} publishes protected models but the policy has no "
                                 "[keys] lock; add `lock = \"keys/lock.key\"` (from `mergeops keygen`).")
            report = protect(ready, tmp / "protected", keys.load_lock_key(policy.keys.lock))
            protection = ProtectionRecorded.from_payload(report["ledger"])
            ready = tmp / "protected"
        published_digest = (protection.output_digest if protection else folder_digest(ready) if adapter
                            else record.output_digest)
        signer = None
        if config.sign:
            assert ledger.key is not None  # a writable ledger has the key
            sign_model_folder(ready, keys.signing_key_path(policy.keys))
            signer = keys.fingerprint(ledger.key.public_key())
        published_files = _file_hashes(ready)  # card and signature included: the audit checks all of them
        if config.hub is not None:
            sha = upload_to_hub(ready, config.hub, message=f"mergeops: {stream.name} {name} "
                                f"({stream.method}, {published_digest})")
            targets.append(str(HubUri(config.hub, sha)))
        if target is not None:
            ready.chmod(0o755)
            fsync_dir(ready)
            note.parent.mkdir(parents=True, exist_ok=True)
            write_durably(note, json.dumps({"target": str(target), "files": published_files}).encode())
            fsync_dir(note.parent)
            os.rename(ready, target)
            fsync_dir(target.parent)
            targets.append(str(target))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    events: list[LedgerEvent] = [dataclasses.replace(
        protection, path=ledger.relative(targets[-1]) if targets else "")] if protection else []
    recorded_adapter = {"rank": adapter.rank, "error": adapter.error} if adapter is not None else None
    events += [PublicationRecorded(stream.name, record.version, published_digest, ledger.relative(t), signer,
                                   published_files, recorded_adapter) for t in targets]
    ledger.record(*events)
    note.unlink(missing_ok=True)
    return Publication(stream.name, record.version, tuple(targets), published_digest, signer, adapter)


def _file_hashes(folder: Path) -> dict[str, str]:
    """The sha256 of every file in ``folder``, by its path relative to it."""
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _left_by_crash(target: Path, note: Path) -> bool:
    """Whether ``target`` is the copy this stream renamed into place and did not record: the note written before the
    rename names it, and it holds exactly the files the note lists."""
    if target.is_symlink() or not target.is_dir() or not note.is_file():
        return False
    try:
        pending = untrusted.read_json(note)
        return bool(pending["target"] == str(target) and _file_hashes(target) == pending["files"])
    except (OSError, MergeopsError, KeyError, TypeError):  # a note cut short by the crash: its rename never happened
        return False


def _recorded_names(ledger: Ledger, stream: StreamConfig, folder: Path) -> set[str]:
    """The published copies this home's ledger records in ``folder``."""
    targets = {Path(p.target) for v in ledger.versions(stream.name) for p in ledger.publications(stream.name, v.version)
               if not is_hub(p.target)}
    return {t.name for t in targets if t.parent.resolve() == folder.resolve()}


def _stream_base(stream: StreamConfig, ledger: Ledger) -> Path:
    """The stream's base folder, checked to be the one the stream started from (an adapter is a difference to it)."""
    started = ledger.started(stream.name)
    if isinstance(stream.base, str) or not stream.base.is_dir() or started is None:
        raise UsageError(f"stream {stream.name!r}: its base {stream.base} is not a local model folder, so no adapter "
                         f"can be made against it; point [streams.{stream.name}].base at the base's folder.")
    if folder_digest(stream.base) != started.base_digest:
        raise MergeopsError(f"stream {stream.name!r}: the base {stream.base} is not the one the stream started from "
                            f"({started.base_digest}); an adapter against it would be wrong, restore that base. "
                            "Nothing was published.")
    return stream.base


def _stage(source: Path, dest: Path, files: dict[str, str], where: str) -> None:
    """Copy a version's files, checked against the sha256 recorded when they were written, and its card."""
    _copy_verified(source, dest, files, where)
    for name in ("README.md", "provenance.json"):
        if (source / name).is_file():
            copy_durably(source / name, dest / name)


def _copy_verified(source: Path, dest: Path, files: dict[str, str], where: str) -> None:
    for name, recorded in sorted(files.items()):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_durably(source / name, target)
        if file_sha256(target) != recorded:
            raise MergeopsError(f"{where}: file {name} in {source} differs from what was recorded when it was "
                                "written; it was not published (run `mergeops audit`).")
