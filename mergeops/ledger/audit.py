"""`mergeops audit`: is the ledger intact, and is every retained output what it recorded?

Checks, each naming what is broken: the signer (the key that signs the ledger is the policy's, pinned by
fingerprint where the policy says so); the event chain (hashes, order, signatures); the signed head (events cut
off the end); the history tables against a replay of the events (an edited value, a deleted or an extra row);
every retained version's files, card and provenance against the sha256 recorded when they were written, and its
``latest`` link; every local published copy, file by file; and rollback: a version or published copy on disk
beyond the last one the ledger records (the ledger was cut back, or a fold crashed before recording).

It reads one snapshot of the ledger while the daemon may be folding. What a write committed after the snapshot can
explain (a version folder beyond the snapshot's head, a pruned version's folder gone, the head's state recycled,
``latest`` moved) is a doubt, not yet a problem: it is re-checked against the ledger as it is once the files are
checked, waiting a bounded time while a writer holds the home's lock, and reported only if it still holds.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from sqlite_utils import Database

from mergeops import keys, untrusted
from mergeops.errors import MergeopsError, ModelFolderError, UntrustedFileError
from mergeops.hub_uri import SCHEME, is_hub
from mergeops.ledger.events import Event, canonical, chain_problems
from mergeops.ledger.lock import is_held
from mergeops.ledger.store import HEAD_FILE, Ledger
from mergeops.ledger.tables import HISTORY_TABLES, apply, migrations
from mergeops.model import folder_digest
from mergeops.model.digest import digest_files, file_sha256

# How long a doubt may wait for the writer that holds the lock to commit what explains it: longer than the steps of a
# fold between its version folder appearing and its record (candidate gates, cards), short enough for a prompt audit.
SETTLE_SECONDS = 30.0
Explained = Callable[[Ledger], bool]  # given the ledger as it is now: whether a later write explains a doubt


@dataclass(frozen=True)
class _Doubt:
    kind: str
    where: str
    message: str
    explained: Explained


@dataclass
class AuditReport:
    events: int = 0
    versions_checked: int = 0
    files_checked: int = 0
    problems: list[dict[str, str]] = field(default_factory=list)
    doubts: list[_Doubt] = field(default_factory=list, repr=False)

    def add(self, kind: str, where: str, message: str) -> None:
        self.problems.append({"kind": kind, "where": where, "message": message})

    def doubt(self, kind: str, where: str, message: str, explained: Explained) -> None:
        """A problem unless a write committed after the audit's snapshot explains it (see :func:`_settle`)."""
        self.doubts.append(_Doubt(kind, where, message, explained))

    def to_json(self) -> dict[str, Any]:
        return {"ok": not self.problems, "events": self.events, "versions_checked": self.versions_checked,
                "files_checked": self.files_checked, "problems": self.problems}


def trusted_key(policy_keys: keys.SigningKeyConfig, report: AuditReport) -> ec.EllipticCurvePublicKey:
    """The key the ledger must be signed with: derived from the private key where it is readable (a swapped
    ``signing.pub.pem`` is a problem), else ``signing.pub.pem``; either must match ``[keys] signer`` if pinned."""
    private = keys.signing_key_path(policy_keys)
    public_file = keys.public_key_file(private)
    key = None
    if private.is_file():
        try:
            key = keys.load_signing_key(private).public_key()
        except MergeopsError:
            key = None
    if public_file.is_file():
        published = keys.load_public_key(public_file)
        if key is not None and keys.fingerprint(published) != keys.fingerprint(key):
            report.add("signer", str(public_file), f"{public_file} is not the public half of {private}: it was "
                       "replaced; the ledger is checked against the private key's.")
        key = key or published
    if key is None:
        key = keys.public_key_for(policy_keys)  # raises the usual message: no key to check against
    if policy_keys.signer is not None and keys.fingerprint(key) != policy_keys.signer:
        report.add("signer", "[keys] signer", f"the policy pins signer {policy_keys.signer}, but its signing key is "
                   f"{keys.fingerprint(key)}: the keys were replaced; every signature is checked against the "
                   "pinned key's, so nothing signed by another key passes.")
    return key


def audit(ledger: Ledger, public_key: ec.EllipticCurvePublicKey, report: AuditReport | None = None,
          folders: Mapping[str, Iterable[Path]] | None = None, *, settle_seconds: float = SETTLE_SECONDS
          ) -> AuditReport:
    """Safe while a writer runs: the head file is read first (it only ever trails the database), and every
    query runs in one read transaction, so the events, the tables and the versions whose files are checked are the
    same snapshot; doubts are settled after it (``settle_seconds``: the longest wait for a writer). ``folders``: per
    stream, the folders its versions and published copies go to (from the policy), searched for rollback
    evidence besides the ones the ledger names."""
    report = report or AuditReport()
    head_file = ledger.home / HEAD_FILE
    head = _read_head(head_file)
    ledger.db.execute("BEGIN")
    try:
        rows = ledger.events()
        report.events = len(rows)
        for message in chain_problems(rows, public_key):
            report.add("event", "events", message)
        _check_head(head_file, head, rows, public_key, report)
        _check_tables(ledger, rows, report)
        _check_outputs(ledger, report)
        _check_publications(ledger, report)
        _check_rollback(ledger, report, folders or {})
    finally:
        ledger.db.execute("ROLLBACK")
    _settle(ledger, report, settle_seconds)
    return report


def _read_head(path: Path) -> str | None:
    """The head file's text (None: there is none); one the door refuses (a FIFO, huge, not UTF-8) reads as empty,
    which is not validly signed."""
    try:
        return untrusted.read_text(path, max_bytes=64 << 10) if os.path.lexists(path) else None
    except UntrustedFileError:
        return ""



def _settle(ledger: Ledger, report: AuditReport, settle_seconds: float) -> None:
    """Report each doubt that the ledger as it is now does not explain. While a writer holds the lock, a doubt may be
    a fold between writing its folder and recording it (or between recording it and pointing ``latest``), so it
    is re-checked until explained, the writer lets go, or ``settle_seconds`` pass."""
    deadline = time.monotonic() + settle_seconds
    doubts = report.doubts
    while True:
        writing = is_held(ledger.home)  # before the check: a writer that lets go after it has committed what it wrote
        doubts = [d for d in doubts if not _explained_now(ledger, d)]
        if not doubts or not writing or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    for d in doubts:
        report.add(d.kind, d.where, d.message)
    report.doubts = []


def _explained_now(ledger: Ledger, doubt: _Doubt) -> bool:
    ledger.db.execute("BEGIN")  # one snapshot for the doubt's queries
    try:
        return doubt.explained(ledger)
    except Exception:  # whatever cannot be read now does not explain anything
        return False
    finally:
        ledger.db.execute("ROLLBACK")


def _head_version(ledger: Ledger, stream: str) -> int:
    rows = ledger._rows("SELECT max(version) AS version FROM versions WHERE stream = ?", (stream,))
    return rows[0]["version"] or 0 if rows else 0


def _moved_on(stream: str, version: int) -> Explained:
    """Explained once the stream has a newer head (the fold that made it recycles this head's state)."""
    return lambda now: _head_version(now, stream) > version


def _pruned(stream: str, version: int) -> Explained:
    """Explained once the ledger records the version pruned (its folder is removed after that record)."""
    return lambda now: bool(now._rows("SELECT 1 FROM versions WHERE stream = ? AND version = ? AND pruned = 1",
                                      (stream, version)))


def _recorded_or_gone(stream: str, version: int, folder: Path) -> Explained:
    """Explained once the ledger records the version (a fold committed it) or its folder is gone (a rejected fold's
    candidate, removed); and while a writer holds the lock and the folder has no provenance yet: a candidate its
    gates still check (an eval may run for an hour), whose cards are written only once it passed. A committed
    version's folder has them, so a rolled-back one is still reported."""
    return lambda now: (_head_version(now, stream) >= version or not os.path.lexists(folder)
                        or (is_held(now.home) and not os.path.lexists(folder / "provenance.json")))


def _latest_at_head(stream: str, link: Path) -> Explained:
    def explained(now: Ledger) -> bool:
        head = now._rows("SELECT path FROM versions WHERE stream = ? ORDER BY version DESC LIMIT 1", (stream,))
        return bool(head) and link.is_symlink() and os.readlink(link) == now.located(head[0]["path"]).name
    return explained


def _check_head(path: Path, text: str | None, rows: list[dict[str, Any]], public_key: ec.EllipticCurvePublicKey,
                report: AuditReport) -> None:
    if text is None:
        if rows:
            report.add("head", str(path), f"{path} is missing, so events cut off the end could go unnoticed.")
        return
    try:
        head = untrusted.parse_json(text, path)
        body = {"seq": head["seq"], "hash": head["hash"]}
        valid = keys.verify(public_key, canonical(body).encode(), bytes.fromhex(head["signature"]))
    except (ValueError, KeyError, TypeError, UntrustedFileError):
        valid = False
    if not valid:
        report.add("head", str(path), f"{path} is not validly signed by this policy's key.")
        return
    by_seq = {row["seq"]: row for row in rows}
    if head["seq"] not in by_seq:
        report.add("head", str(path), f"the ledger ends before event {head['seq']}, which {path} records: events "
                   "were deleted from the end of the chain.")
    elif by_seq[head["seq"]]["hash"] != head["hash"]:
        report.add("head", str(path), f"event {head['seq']} differs from the one {path} records.")


def _check_tables(ledger: Ledger, rows: list[dict[str, Any]], report: AuditReport) -> None:
    """Replay the events into an empty database and compare every history table with the real one."""
    replay = Database(memory=True)
    migrations.apply(replay)
    for row in rows:
        try:
            apply(replay, Event.from_row(row))
        except Exception as exc:  # a corrupted payload cannot be replayed; the chain check names it
            report.add("event", "events", f"event {row['seq']} ({row['kind']}) cannot be replayed ({exc}).")
    for table, pk in HISTORY_TABLES.items():
        order = ", ".join(pk)
        expected = {tuple(r[k] for k in pk): r for r in replay.query(f"SELECT * FROM {table} ORDER BY {order}")}
        actual = {tuple(r[k] for k in pk): r for r in ledger.db.query(f"SELECT * FROM {table} ORDER BY {order}")}
        for key in expected.keys() - actual.keys():
            report.add("row", table, f"table {table}: row {_key(pk, key)} was deleted (its events say it exists).")
        for key in actual.keys() - expected.keys():
            report.add("row", table, f"table {table}: row {_key(pk, key)} is not backed by any event (it was "
                       "inserted by hand).")
        for key in expected.keys() & actual.keys():
            for column, value in expected[key].items():
                if actual[key].get(column) != value:
                    report.add("row", table, f"table {table}: row {_key(pk, key)} column {column} is "
                               f"{actual[key].get(column)!r}, but its events say {value!r}.")


def _key(pk: tuple[str, ...], key: tuple[Any, ...]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in zip(pk, key, strict=True))


def _check_outputs(ledger: Ledger, report: AuditReport) -> None:
    """Re-hash every retained (not pruned) version against the per-file sha256 recorded at write time, and
    each stream's current method state against its recorded digest (every later version builds on it)."""
    for head in ledger._rows("SELECT stream, version, state_path, state_digest FROM versions v WHERE version = "
                            "(SELECT max(version) FROM versions WHERE stream = v.stream)"):
        where = f"{head['stream']} v{head['version']:04d}"
        state = ledger.located(head["state_path"])
        moved_on = _moved_on(head["stream"], head["version"])
        if not state.is_dir():
            report.doubt("state", where, f"{where}: its method state {state} is missing; the next fold cannot run.",
                         moved_on)
        elif _digest_or_none(state) != head["state_digest"]:
            report.doubt("state", where, f"{where}: its method state in {state} was changed after it was written; "
                         "every later version would build on it.", moved_on)
    for version in ledger._rows("SELECT stream, version, path, files, cards FROM versions WHERE pruned = 0"):
        where = f"{version['stream']} v{version['version']:04d}"
        folder = ledger.located(version["path"])
        pruned = _pruned(version["stream"], version["version"])
        report.versions_checked += 1
        recorded = json.loads(version["files"]) | json.loads(version["cards"] or "{}")
        try:
            listed = digest_files(folder)
        except ModelFolderError as exc:
            if folder.is_dir():  # a FIFO or a link out of it: not what was written
                report.add("file", where, f"{where}: {exc}")
            else:
                report.doubt("file", where, f"{where}: its folder {folder} is missing.", pruned)
            continue
        present = set(listed) | {n for n in json.loads(version["cards"] or "{}") if (folder / n).exists()}
        _compare_files(folder, recorded, present, where, ("it was written", "the version was written"), report,
                       pruned)
    for head in ledger._rows("SELECT stream, version, path FROM versions v WHERE pruned = 0 AND version = "
                            "(SELECT max(version) FROM versions WHERE stream = v.stream)"):
        folder = ledger.located(head["path"])
        link = folder.parent / "latest"
        target = os.readlink(link) if link.is_symlink() else None
        if target != folder.name:
            report.doubt("latest", str(link), f"{link} points at {target or 'nothing'}, not at the newest version "
                         f"{folder.name} of stream {head['stream']}.", _latest_at_head(head["stream"], link))


def _digest_or_none(folder: Path) -> str | None:
    """The folder's digest; None if it went away while it was read (a fold recycling it)."""
    try:
        return folder_digest(folder)
    except (MergeopsError, OSError):
        return None


def _compare_files(folder: Path, recorded: dict[str, str], present: set[str], where: str, when: tuple[str, str],
                   report: AuditReport, gone: Explained | None = None) -> None:
    """``when``: after what a file was changed, and after what one was added (for the messages); ``gone``: what
    explains a missing file (the version was pruned while it was checked), if anything does."""
    for name in sorted(recorded):
        try:
            found = file_sha256(folder / name) if name in present else None
        except FileNotFoundError:
            found = None
        except UntrustedFileError:  # a FIFO or device in its place: not the file that was written
            found = "not a regular file"
        if found is None:
            message = f"{where}: file {name} is missing from {folder}."
            report.doubt("file", where, message, gone) if gone else report.add("file", where, message)
            continue
        report.files_checked += 1
        if found != recorded[name]:
            report.add("file", where, f"{where}: file {name} in {folder} was changed after {when[0]}.")
    for name in sorted(present - recorded.keys()):
        report.add("file", where, f"{where}: file {name} in {folder} was added after {when[1]}.")


def _check_publications(ledger: Ledger, report: AuditReport) -> None:
    """Every published copy in a local folder, file by file (card and signature included); on the Hub the
    commit is recorded and cannot change."""
    for p in ledger._rows("SELECT stream, version, target, output_digest, files FROM publications ORDER BY id"):
        if is_hub(p["target"]):
            continue
        where = f"{p['stream']} v{p['version']:04d} published"
        folder = ledger.located(p["target"])
        if not folder.is_dir():
            report.add("published", where, f"{where}: the published copy {folder} is missing.")
            continue
        recorded = json.loads(p["files"] or "{}")
        if recorded:
            present = {q.relative_to(folder).as_posix() for q in folder.rglob("*") if q.is_file()}
            _compare_files(folder, recorded, present, where, ("it was published", "it was published"), report)
        elif _digest_or_none(folder) != p["output_digest"]:
            report.add("published", where, f"{where}: the published copy {folder} was changed after it was published.")


def _check_rollback(ledger: Ledger, report: AuditReport, folders: Mapping[str, Iterable[Path]]) -> None:
    """A version folder or published copy beyond each stream's last recorded version: its events are gone (the
    ledger and its signed head were put back to an older state), or a fold crashed before recording it (the
    stream's next fold removes such a folder)."""
    for head in ledger._rows("SELECT stream, max(version) AS version, path FROM versions GROUP BY stream"):
        roots = {ledger.located(head["path"]).parent, *folders.get(head["stream"], ())}
        roots |= {ledger.located(r["target"]).parent for r in ledger._rows(
            "SELECT target FROM publications WHERE stream = ? AND target NOT LIKE ?", (head["stream"], f"{SCHEME}%"))}
        for root in sorted(roots):
            for child in sorted(root.iterdir()) if root.is_dir() else []:
                match = re.fullmatch(r"v(\d{4,})(?:-.+)?", child.name)  # a version, or a copy of one (v0003-lora-r64)
                if match and int(match.group(1)) > head["version"]:
                    report.doubt("rollback", str(child), f"{child} is on disk, but the ledger's last version of stream "
                                 f"{head['stream']} is v{head['version']:04d}: events were removed from the ledger (or "
                                 "a fold crashed before recording it; the stream's next fold removes such a folder).",
                                 _recorded_or_gone(head["stream"], int(match.group(1)), child))
