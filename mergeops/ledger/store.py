"""The provenance ledger: an SQLite file in the policy's home, written only through signed events.

One writer at a time (the daemon or a `fold`; ``BEGIN IMMEDIATE`` serialises them), any number of
readers (WAL mode): `status` and `lineage` never see a half-written fold. Each write appends events and
applies them to the history tables in the same transaction, after the files they point to are durable.
A signed head file beside the database lets `audit` notice events cut off the end of the chain.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from sqlite_utils import Database

from mergeops import keys
from mergeops.durable import fsync_dir, write_durably
from mergeops.errors import PolicyError, disk_full, no_space
from mergeops.hub_uri import is_hub
from mergeops.ledger.events import GENESIS, Event, canonical
from mergeops.ledger.kinds import CheckpointFacts, CheckpointRejected, LedgerEvent, StreamStarted
from mergeops.ledger.lock import WriterLock
from mergeops.ledger.tables import apply, migrations
from mergeops.model.digest import digest_of_listing, is_digest_excluded
from mergeops.policy import Policy

LEDGER_FILE = "ledger.db"
HEAD_FILE = "ledger-head.json"
BUSY_TIMEOUT_MS = 30_000


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class VersionRecord:
    """One committed version of a stream, as the ledger holds it."""

    stream: str
    version: int
    output: str  # where the version's folder is now
    output_digest: str
    files: dict[str, str]  # sha256 of every file but the cards, as written
    state: str
    method: str
    params: dict[str, Any]
    gates: tuple[str, ...]
    policy_digest: str
    tool: str
    created: str
    signer: str | None  # fingerprint of the key that signed its event (None if that event was deleted)
    pruned: bool
    # the checkpoint folded into it
    checkpoint: str  # its digest
    source: str
    arrived: str
    size: int | None
    parameters: int | None
    metrics: dict[str, float]
    adapter: dict[str, Any] | None = None  # a LoRA adapter's settings


@dataclass(frozen=True)
class PublicationRecord:
    stream: str
    version: int
    target: str  # where the published copy is now, or hf://org/repo@sha
    output_digest: str
    signer: str | None  # of the model signature; None if unsigned
    created: str
    files: dict[str, str]  # sha256 of every file of the copy (empty in older ledgers)


@dataclass(frozen=True)
class ProtectionRecord:
    source_digest: str
    output_digest: str
    path: str  # where the protected copy is now
    key_fingerprint: str
    scheme: str
    created: str


@dataclass(frozen=True)
class Rejection:
    """A checkpoint a gate refused."""

    arrived: str
    stream: str
    source: str
    digest: str | None  # None if it was refused before it was read
    gate: str
    reason: str


QUARANTINED = "quarantined"  # a queued item that failed too often: never retried until `mergeops retry`


@dataclass(frozen=True)
class QueueItem:
    """An arrival the daemon queued, and how far it got (``pending``, ``merged``, ``failed``, ``publishing``,
    ``quarantined``...)."""

    id: int
    stream: str
    source: str
    fingerprint: str
    queued: str
    state: str
    result: str | None  # the fold's result as JSON
    attempts: int = 0  # failed attempts so far (older ledgers: none counted)
    error: str | None = None  # why the last attempt failed

    @property
    def publication(self) -> bool:
        """Whether what failed is the publication of a folded version (else it is the fold)."""
        return self.result is not None


@dataclass(frozen=True)
class StreamCounts:
    folded: int
    rejected: int
    pending: int
    failed: int  # arrivals and publications that failed and are retried at the daemon's next start
    quarantined: int
    last_event: str | None  # time of the stream's newest event


@dataclass(frozen=True)
class Heartbeat:
    """The daemon's last sign of life (not a signed record)."""

    pid: int
    time: str
    status: str


class NoLedger(PolicyError):
    """Nothing has been recorded in this home yet."""


class Ledger:
    """Open with :meth:`open` (the home's one writer, with the signing key) or :meth:`open_readonly`."""

    def __init__(self, home: Path, signing_key: ec.EllipticCurvePrivateKey | None, *, read_only: bool = False,
                 immutable: bool = False, lock: WriterLock | None = None) -> None:
        self.home = Path(home)
        self.path = self.home / LEDGER_FILE
        self.key = signing_key
        self._lock = lock
        target: str | Path = self.path
        if read_only:
            target = f"{self.path.resolve().as_uri()}?mode=ro" + ("&immutable=1" if immutable else "")
        connection = sqlite3.connect(target, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, uri=read_only)
        self.db = Database(connection)
        self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self.db.execute("PRAGMA foreign_keys = ON")

    @classmethod
    def open(cls, home: Path, signing_key: ec.EllipticCurvePrivateKey, *, role: str = "fold",
             lock: WriterLock | None = None) -> Ledger:
        """The home's writable ledger. It takes the home's writer lock as ``role`` (or owns ``lock``, one the
        caller took already) until :meth:`close`, so a second writer fails at once and says who writes."""
        home.mkdir(parents=True, exist_ok=True)
        lock = lock or WriterLock(home, role)
        ledger = None
        try:
            ledger = cls(home, signing_key, lock=lock)
            ledger.db.execute("PRAGMA journal_mode = WAL")
            ledger.db.execute("PRAGMA synchronous = FULL")
            if migrations.pending(ledger.db):
                migrations.apply(ledger.db)
        except BaseException:
            if ledger is not None:
                ledger.close()  # and the lock with it
            else:
                lock.release()
            raise
        return ledger

    @classmethod
    def for_policy(cls, policy: Policy, *, role: str) -> Ledger:
        """The policy's writable ledger (in ``policy.home``, signed with its ``[keys] signing`` key)."""
        return cls.open(policy.home, keys.load_signing_key(keys.signing_key_path(policy.keys)), role=role)

    @classmethod
    def open_readonly(cls, home: Path) -> Ledger:
        """For commands that only read (status, audit, lineage): a read-only connection, so they work on a full
        disk. Where SQLite cannot set up its shared-memory file (a full disk), and the write-ahead log is empty (so
        the database file is the whole truth), the file is read as immutable."""
        if not (home / LEDGER_FILE).is_file():
            raise NoLedger(f"there is no ledger in {home} yet; nothing has been folded with this policy.")
        ledger = cls(home, None, read_only=True)
        try:
            ledger.db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        except sqlite3.OperationalError as exc:
            ledger.close()
            wal = home / f"{LEDGER_FILE}-wal"
            if wal.is_file() and wal.stat().st_size:
                raise no_space(home, committed=(  # a reader: what was committed is in the log it cannot read
                    f"the ledger's newest records, in {wal.name}, cannot be read until SQLite can create its "
                    "shared-memory file beside it")) if disk_full(exc) else exc from None
            ledger = cls(home, None, read_only=True, immutable=True)
        if not ledger.db["events"].exists():  # its first writer is creating it this moment
            ledger.close()
            raise NoLedger(f"the ledger in {home} is being created; nothing has been recorded in it yet.")
        return ledger

    def close(self) -> None:
        self.db.conn.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")  # take the write lock before reading the chain's head
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def record(self, *events: LedgerEvent) -> list[Event]:
        """Append ``events`` and apply them to the tables, all in one transaction."""
        if self.key is None:
            raise RuntimeError("this ledger was opened read-only")
        created = []
        with self._transaction():
            last = self.db.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (last[0], last[1]) if last else (0, GENESIS)
            for typed in events:
                seq += 1
                payload = json.loads(canonical(typed.payload()))  # as it reads back: tuples are lists
                event = Event.create(seq, utc_now(), typed.kind, payload, prev, self.key)
                self.db["events"].insert(event.row())
                apply(self.db, event)
                created.append(event)
                prev = event.hash
        self._write_head(created[-1])
        return created

    def record_rejection(self, stream: str, checkpoint: CheckpointFacts, gate: str, reason: str
                         ) -> CheckpointRejected:
        """Record that ``gate`` refused a checkpoint of ``stream`` (known at least by its source), and why."""
        rejection = CheckpointRejected(stream, checkpoint, gate, reason)
        self.record(rejection)
        return rejection

    def _write_head(self, event: Event) -> None:
        assert self.key is not None
        body = {"seq": event.seq, "hash": event.hash}
        head = body | {"signer": keys.fingerprint(self.key.public_key()),
                       "signature": keys.sign(self.key, canonical(body).encode()).hex()}
        tmp = self.home / f".{HEAD_FILE}.tmp-{os.getpid()}"
        write_durably(tmp, (canonical(head) + "\n").encode())
        os.replace(tmp, self.home / HEAD_FILE)
        fsync_dir(self.home)

    # -- paths: stored relative to the home, so a copied or moved deployment checks its own files -----------
    def relative(self, path: str | os.PathLike[str]) -> str:
        """How a local path is recorded: relative to the home (``../merged/s/v0001``); Hub sources as they are."""
        text = os.fspath(path)
        if is_hub(text) or not text:
            return text
        return os.path.relpath(os.path.abspath(text), os.path.abspath(self.home))

    def located(self, recorded: str) -> Path:
        """Where a recorded path is now (older ledgers recorded absolute paths, which stay as they are)."""
        return Path(os.path.normpath(self.home / recorded)) if recorded and not is_hub(recorded) \
            else Path(recorded)

    # -- reading -------------------------------------------------------------------------------
    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return list(self.db.query(sql, params))

    _VERSIONS = ("SELECT v.*, c.source, c.arrived, c.size, c.parameters, c.metrics, c.adapter, e.signer "
                 "FROM versions v JOIN checkpoints c ON c.id = v.checkpoint_id "
                 "LEFT JOIN events e ON e.seq = v.checkpoint_id ")

    def _versions(self, where: str, params: tuple[Any, ...], order: str = "v.version") -> list[VersionRecord]:
        return [VersionRecord(
            stream=r["stream"], version=r["version"], output=str(self.located(r["path"])),
            output_digest=r["output_digest"], files=json.loads(r["files"]), state=str(self.located(r["state_path"])),
            method=r["method"], params=json.loads(r["params"]), gates=tuple(json.loads(r["gates"])),
            policy_digest=r["policy_digest"], tool=r["tool"], created=r["created"], signer=r["signer"],
            pruned=bool(r["pruned"]), checkpoint=r["checkpoint_digest"], source=r["source"], arrived=r["arrived"],
            size=r["size"], parameters=r["parameters"], metrics=json.loads(r["metrics"]),
            adapter=json.loads(r["adapter"]) if r["adapter"] else None,
        ) for r in self._rows(f"{self._VERSIONS} WHERE {where} ORDER BY {order}", params)]

    def _first_version(self, where: str, params: tuple[Any, ...], order: str = "v.version") -> VersionRecord | None:
        found = self._versions(where, params, order + " LIMIT 1")
        return found[0] if found else None

    def head(self, stream: str) -> VersionRecord | None:
        return self._first_version("v.stream = ?", (stream,), "v.version DESC")

    def versions(self, stream: str) -> list[VersionRecord]:
        return self._versions("v.stream = ?", (stream,))

    def version(self, stream: str, number: int) -> VersionRecord | None:
        return self._first_version("v.stream = ? AND v.version = ?", (stream, number))

    def version_with_checkpoint(self, stream: str, digest: str, weights_digest: str | None = None
                                ) -> VersionRecord | None:
        """The version that folded this checkpoint: the same folder digest, or the same weights (a folder that
        only gained or lost a file beside its weights, such as trainer_state.json, is the same checkpoint)."""
        found = self._first_version("v.stream = ? AND v.checkpoint_digest = ?", (stream, digest))
        if found is None and weights_digest is not None:
            found = self._first_version("v.stream = ? AND json_extract(e.payload, '$.checkpoint.weights_digest') = ?",
                                        (stream, weights_digest))
        return found

    def version_with_output(self, digest: str) -> VersionRecord | None:
        """The (first) version whose folder has this digest, in any stream."""
        return self._first_version("v.output_digest = ?", (digest,))

    def taken_before(self, stream: str, source: str, fingerprint: str) -> bool:
        """Whether the daemon folded this registry folder before (merged or duplicate) with other contents."""
        return bool(self._rows("SELECT 1 FROM queue WHERE stream = ? AND source = ? AND fingerprint != ? AND state "
                               "IN ('merged', 'duplicate') LIMIT 1", (stream, source, fingerprint)))

    def update_norms(self, stream: str) -> list[float]:
        """Task-vector norms of the accepted checkpoints that were measured (for max_update_ratio)."""
        return [r["update_norm"] for r in self._rows("SELECT update_norm FROM versions WHERE stream = ? AND "
                                                    "update_norm IS NOT NULL ORDER BY version", (stream,))]

    def started(self, stream: str) -> StreamStarted | None:
        """How the stream started (its base, the base's digest, its method), if it has."""
        rows = self._rows("SELECT * FROM streams WHERE name = ?", (stream,))
        if not rows:
            return None
        row = rows[0]
        return StreamStarted(row["name"], row["base"], row["base_digest"], row["method"], json.loads(row["params"]))

    def rejections(self, stream: str) -> list[Rejection]:
        """The stream's rejected checkpoints, oldest first."""
        return [Rejection(r["arrived"], r["stream"], r["source"], r["digest"], r["gate"], r["reason"])
                for r in self._rows("SELECT * FROM checkpoints WHERE stream = ? AND status = 'rejected' ORDER BY id",
                                    (stream,))]

    def counts(self, stream: str) -> StreamCounts:
        """How many versions, rejections, waiting and failed arrivals the stream has, and when it last changed."""
        def count(table: str, where: str) -> int:
            return self._rows(f"SELECT count(*) AS n FROM {table} WHERE stream = ?{where}", (stream,))[0]["n"]

        last = self._rows("SELECT max(time) AS t FROM events WHERE json_extract(payload, '$.stream') = ?",
                          (stream,))[0]["t"]
        return StreamCounts(folded=count("versions", ""), rejected=count("checkpoints", " AND status = 'rejected'"),
                            pending=count("queue", " AND state = 'pending'"),
                            failed=len(self.failed(stream)), quarantined=len(self.queued(QUARANTINED, stream=stream)),
                            last_event=last)

    def publications(self, stream: str, version: int) -> list[PublicationRecord]:
        """Where this version was published, oldest first."""
        return [PublicationRecord(r["stream"], r["version"], str(self.located(r["target"])), r["output_digest"],
                                  r["signer"], r["created"], json.loads(r["files"] or "{}"))
                for r in self._rows("SELECT * FROM publications WHERE stream = ? AND version = ? ORDER BY id",
                                    (stream, version))]

    def publication_with_digest(self, digest: str) -> PublicationRecord | None:
        """The publication whose copy has this folder digest (a copy other than the version itself, such as an
        adapter), from the files recorded when it was published."""
        for r in self._rows("SELECT * FROM publications WHERE files IS NOT NULL ORDER BY id"):
            files = json.loads(r["files"])
            if files and digest_of_listing({f: h for f, h in files.items() if not is_digest_excluded(f)}) == digest:
                return PublicationRecord(r["stream"], r["version"], str(self.located(r["target"])), r["output_digest"],
                                         r["signer"], r["created"], files)
        return None

    def _protections(self, column: str, digest: str) -> list[ProtectionRecord]:
        return [ProtectionRecord(r["source_digest"], r["output_digest"], str(self.located(r["path"])),
                                 r["key_fingerprint"], r["scheme"], r["created"])
                for r in self._rows(f"SELECT * FROM protections WHERE {column} = ? ORDER BY id", (digest,))]

    def protections_of(self, source_digest: str) -> list[ProtectionRecord]:
        """The protected copies made of the model with this digest, oldest first."""
        return self._protections("source_digest", source_digest)

    def protection_with_output(self, digest: str) -> ProtectionRecord | None:
        """The protected copy with this digest, if one was recorded."""
        found = self._protections("output_digest", digest)
        return found[0] if found else None

    def events(self) -> list[dict[str, Any]]:
        """Every event as stored, oldest first (raw rows: audit checks them byte for byte)."""
        return self._rows("SELECT * FROM events ORDER BY seq")

    # -- the daemon's queue and heartbeat (operational, outside the signed chain) ---------------------------
    def enqueue(self, stream: str, source: str, fingerprint: str, state: str = "pending") -> bool:
        """Queue an arrival once per (stream, source, fingerprint); whether it is new."""
        return bool(self.db.execute(
            "INSERT OR IGNORE INTO queue (stream, source, fingerprint, queued, state) VALUES (?, ?, ?, ?, ?)",
            (stream, source, fingerprint, utc_now(), state)).rowcount)

    def fingerprints(self, stream: str) -> set[tuple[str, str]]:
        """Every (source, fingerprint) queued for ``stream``, in any state: the registry folders not to scan again."""
        return {(r["source"], r["fingerprint"])
                for r in self._rows("SELECT source, fingerprint FROM queue WHERE stream = ?", (stream,))}

    def is_queued(self, stream: str, source: str) -> bool:
        return bool(self._rows("SELECT 1 FROM queue WHERE stream = ? AND source = ?", (stream, source)))

    def queued(self, state: str, limit: int | None = None, *, stream: str | None = None) -> list[QueueItem]:
        """Queued arrivals in ``state`` (of one stream, or all), oldest first."""
        where, params = ("state = ? AND stream = ?", (state, stream)) if stream is not None else ("state = ?", (state,))
        return [QueueItem(**r) for r in self._rows(
            f"SELECT * FROM queue WHERE {where} ORDER BY id" + (f" LIMIT {int(limit)}" if limit else ""), params)]

    def set_queued(self, item_id: int, state: str, result: str | None = None) -> None:
        if result is None:
            self.db.execute("UPDATE queue SET state = ? WHERE id = ?", (state, item_id))
        else:
            self.db.execute("UPDATE queue SET state = ?, result = ? WHERE id = ?", (state, result, item_id))

    def failed(self, stream: str) -> list[QueueItem]:
        """The stream's failed arrivals, and its publications that failed, waiting for the daemon's next start."""
        return [*self.queued("failed", stream=stream),
                *(item for item in self.queued("publishing", stream=stream) if item.error is not None)]

    def count_failure(self, item_id: int, error: str, retry_in: str, attempts_allowed: int) -> QueueItem:
        """Count a failed attempt at a queued item and say why: it waits in state ``retry_in`` for the next try, or,
        at ``attempts_allowed`` failures, is quarantined."""
        self.db.execute("UPDATE queue SET attempts = attempts + 1, error = ?, state = CASE WHEN attempts + 1 >= ? "
                        "THEN ? ELSE ? END WHERE id = ?", (error, attempts_allowed, QUARANTINED, retry_in, item_id))
        return QueueItem(**self._rows("SELECT * FROM queue WHERE id = ?", (item_id,))[0])

    def release_quarantined(self, stream: str | None = None, sources: set[str] | None = None) -> list[QueueItem]:
        """Put quarantined items (of ``stream``, or from one of ``sources``, or all) back in line with no failed
        attempts counted: each is tried again at the daemon's next start. Without the writer lock: the daemon never
        touches a quarantined row, and a row it retries at its start is one this has released."""
        if "attempts" not in self.db["queue"].columns_dict:  # a ledger from before quarantine: none
            return []
        found = [item for item in self.queued(QUARANTINED, stream=stream) if sources is None or item.source in sources]
        for item in found:
            self.db.execute("UPDATE queue SET state = ?, attempts = 0 WHERE id = ? AND state = ?",
                            ("publishing" if item.publication else "failed", item.id, QUARANTINED))
        return found

    def retry_failed(self) -> int:
        """Put failed arrivals back in line; how many."""
        return self.db.execute("UPDATE queue SET state = 'pending' WHERE state = 'failed'").rowcount

    def set_heartbeat(self, pid: int, status: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO heartbeat (id, pid, time, status) VALUES (1, ?, ?, ?)",
                        (pid, utc_now(), status))

    def heartbeat(self) -> Heartbeat | None:
        rows = self._rows("SELECT pid, time, status FROM heartbeat WHERE id = 1")
        return Heartbeat(**rows[0]) if rows else None


def writing(policy: Policy, ledger: Ledger | None, *, role: str) -> AbstractContextManager[Ledger]:
    """For library calls that write: the caller's open ``ledger`` (left open), or else the policy's, opened (and
    its writer lock taken as ``role``) for the ``with`` block."""
    return nullcontext(ledger) if ledger is not None else Ledger.for_policy(policy, role=role)
