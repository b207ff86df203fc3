"""`mergeops audit`: is the ledger intact, and is every retained output what it recorded?

Four checks, each naming what is broken: the event chain (hashes, order, signatures); the signed head
(events cut off the end); the history tables against a replay of the events (an edited value, a
deleted or an extra row); and every retained version's files against the sha256 recorded when they
were written (which file of which version differs, is missing, or was added).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from sqlite_utils import Database

from mergeops import keys
from mergeops.ledger.events import Event, canonical, chain_problems
from mergeops.ledger.store import HEAD_FILE, Ledger
from mergeops.ledger.tables import HISTORY_TABLES, apply, migrations
from mergeops.model import folder_digest
from mergeops.model.digest import digest_files, file_sha256


@dataclass
class AuditReport:
    events: int = 0
    versions_checked: int = 0
    files_checked: int = 0
    problems: list[dict[str, str]] = field(default_factory=list)

    def add(self, kind: str, where: str, message: str) -> None:
        self.problems.append({"kind": kind, "where": where, "message": message})

    def to_json(self) -> dict[str, Any]:
        return {"ok": not self.problems, "events": self.events, "versions_checked": self.versions_checked,
                "files_checked": self.files_checked, "problems": self.problems}


def audit(ledger: Ledger, public_key: ec.EllipticCurvePublicKey) -> AuditReport:
    """Safe while a writer runs: the head file is read first (it only ever trails the database), and every
    query runs in one read transaction, so the events and the tables are the same snapshot."""
    report = AuditReport()
    head_file = ledger.home / HEAD_FILE
    head = head_file.read_text() if head_file.is_file() else None
    ledger.db.execute("BEGIN")
    try:
        rows = ledger.events()
        report.events = len(rows)
        for message in chain_problems(rows, public_key):
            report.add("event", "events", message)
        _check_head(head_file, head, rows, public_key, report)
        _check_tables(ledger, rows, report)
        _check_outputs(ledger, report)
    finally:
        ledger.db.execute("ROLLBACK")
    return report


def _check_head(path: Path, text: str | None, rows: list[dict[str, Any]], public_key: ec.EllipticCurvePublicKey,
                report: AuditReport) -> None:
    if text is None:
        if rows:
            report.add("head", str(path), f"{path} is missing, so events cut off the end could go unnoticed.")
        return
    try:
        head = json.loads(text)
        body = {"seq": head["seq"], "hash": head["hash"]}
        valid = keys.verify(public_key, canonical(body).encode(), bytes.fromhex(head["signature"]))
    except (ValueError, KeyError, TypeError):
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
    for head in ledger.rows("SELECT stream, version, state_path, state_digest FROM versions v WHERE version = "
                            "(SELECT max(version) FROM versions WHERE stream = v.stream)"):
        where = f"{head['stream']} v{head['version']:04d}"
        state = Path(head["state_path"])
        if not state.is_dir():
            report.add("state", where, f"{where}: its method state {state} is missing; the next fold cannot run.")
        elif folder_digest(state) != head["state_digest"]:
            report.add("state", where, f"{where}: its method state in {state} was changed after it was written; "
                       "every later version would build on it.")
    for version in ledger.rows("SELECT stream, version, path, files FROM versions WHERE pruned = 0"):
        where = f"{version['stream']} v{version['version']:04d}"
        folder = Path(version["path"])
        recorded: dict[str, str] = json.loads(version["files"])
        report.versions_checked += 1
        if not folder.is_dir():
            report.add("file", where, f"{where}: its folder {folder} is missing.")
            continue
        present = set(digest_files(folder))
        for name in sorted(recorded):
            if name not in present:
                report.add("file", where, f"{where}: file {name} is missing from {folder}.")
                continue
            report.files_checked += 1
            if file_sha256(folder / name) != recorded[name]:
                report.add("file", where, f"{where}: file {name} in {folder} was changed after it was written.")
        for name in sorted(present - recorded.keys()):
            report.add("file", where, f"{where}: file {name} in {folder} was added after the version was written.")
