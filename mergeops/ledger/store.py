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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
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
from mergeops.ledger.tables import apply, migrations

LEDGER_FILE = "ledger.db"
HEAD_FILE = "ledger-head.json"
BUSY_TIMEOUT_MS = 30_000


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class PastCheckpoint:
    """A checkpoint already folded into the stream, as the record knows it."""

    digest: str
    path: Path
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class VersionRecord:
    """One committed version of a stream, as the ledger holds it."""

    stream: str
    version: int
    checkpoint: str  # digest of the checkpoint folded into it
    source: str
    output: str
    output_digest: str
    state: str
    metrics: dict[str, float] = field(default_factory=dict)
    pruned: bool = False


def signing_key_path(policy_keys: Any) -> Path:
    if policy_keys.signing is None:
        raise PolicyError("the policy has no [keys] signing key, which signs every ledger event; create one with "
                          "`mergeops keygen --out keys` and add `[keys]` `signing = \"keys/signing.pem\"`.")
    return policy_keys.signing


def public_key_for(policy_keys: Any) -> ec.EllipticCurvePublicKey:
    """The policy's public key: ``signing.pub.pem`` beside the private key, else derived from it."""
    private = signing_key_path(policy_keys)
    public = private.with_name(private.name.removesuffix(".pem") + ".pub.pem")
    if public.is_file():
        return keys.load_public_key(public)
    return keys.load_signing_key(private).public_key()


class Ledger:
    """Open with :meth:`open` (a writer, needs the signing key) or :meth:`open_readonly`."""

    def __init__(self, home: Path, signing_key: ec.EllipticCurvePrivateKey | None, *, read_only: bool = False,
                 immutable: bool = False) -> None:
        self.home = Path(home)
        self.path = self.home / LEDGER_FILE
        self.key = signing_key
        target: str | Path = self.path
        if read_only:
            target = f"{self.path.resolve().as_uri()}?mode=ro" + ("&immutable=1" if immutable else "")
        connection = sqlite3.connect(target, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, uri=read_only)
        self.db = Database(connection)
        self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self.db.execute("PRAGMA foreign_keys = ON")

    @classmethod
    def open(cls, home: Path, signing_key: ec.EllipticCurvePrivateKey) -> Ledger:
        home.mkdir(parents=True, exist_ok=True)
        ledger = cls(home, signing_key)
        ledger.db.execute("PRAGMA journal_mode = WAL")
        ledger.db.execute("PRAGMA synchronous = FULL")
        if migrations.pending(ledger.db):
            migrations.apply(ledger.db)
        return ledger

    @classmethod
    def open_readonly(cls, home: Path) -> Ledger:
        """For commands that only read (status, audit, lineage): a read-only connection, so they work on a full
        disk. Where SQLite cannot set up its shared-memory file (a full disk), and the write-ahead log is empty (so
        the database file is the whole truth), the file is read as immutable."""
        if not (home / LEDGER_FILE).is_file():
            raise PolicyError(f"there is no ledger in {home} yet; nothing has been folded with this policy.")
        ledger = cls(home, None, read_only=True)
        try:
            ledger.db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        except sqlite3.OperationalError as exc:
            ledger.close()
            wal = home / f"{LEDGER_FILE}-wal"
            if wal.is_file() and wal.stat().st_size:
                raise no_space(home) if disk_full(exc) else exc from None
            ledger = cls(home, None, read_only=True, immutable=True)
        return ledger

    def close(self) -> None:
        self.db.conn.close()

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

    def record(self, *items: tuple[str, dict[str, Any]]) -> list[Event]:
        """Append events ``(kind, payload)`` and apply them, all in one transaction."""
        if self.key is None:
            raise RuntimeError("this ledger was opened read-only")
        created = []
        with self._transaction():
            last = self.db.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (last[0], last[1]) if last else (0, GENESIS)
            for kind, payload in items:
                seq += 1
                event = Event.create(seq, utc_now(), kind, json.loads(canonical(payload)), prev, self.key)
                self.db["events"].insert(event.row())
                apply(self.db, event)
                created.append(event)
                prev = event.hash
        self._write_head(created[-1])
        return created

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
    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return list(self.db.query(sql, params))

    def _version(self, row: dict[str, Any] | None) -> VersionRecord | None:
        if row is None:
            return None
        checkpoint = self.rows("SELECT source, metrics FROM checkpoints WHERE id = ?", (row["checkpoint_id"],))[0]
        return VersionRecord(row["stream"], row["version"], row["checkpoint_digest"], checkpoint["source"],
                             str(self.located(row["path"])), row["output_digest"], str(self.located(row["state_path"])),
                             json.loads(checkpoint["metrics"]), bool(row["pruned"]))

    def head(self, stream: str) -> VersionRecord | None:
        rows = self.rows("SELECT * FROM versions WHERE stream = ? ORDER BY version DESC LIMIT 1", (stream,))
        return self._version(rows[0] if rows else None)

    def versions(self, stream: str) -> list[VersionRecord]:
        rows = self.rows("SELECT * FROM versions WHERE stream = ? ORDER BY version", (stream,))
        return [v for v in map(self._version, rows) if v is not None]

    def version(self, stream: str, number: int) -> VersionRecord | None:
        rows = self.rows("SELECT * FROM versions WHERE stream = ? AND version = ?", (stream, number))
        return self._version(rows[0] if rows else None)

    def version_with_checkpoint(self, stream: str, digest: str, weights_digest: str | None = None
                                ) -> VersionRecord | None:
        """The version that folded this checkpoint: the same folder digest, or the same weights (a folder that
        only gained or lost a file beside its weights, such as trainer_state.json, is the same checkpoint)."""
        rows = self.rows("SELECT * FROM versions WHERE stream = ? AND checkpoint_digest = ? LIMIT 1",
                         (stream, digest))
        if not rows and weights_digest is not None:
            rows = self.rows("SELECT v.* FROM versions v JOIN events e ON e.seq = v.checkpoint_id WHERE v.stream = ? "
                             "AND json_extract(e.payload, '$.checkpoint.weights_digest') = ? LIMIT 1",
                             (stream, weights_digest))
        return self._version(rows[0] if rows else None)

    def taken_before(self, stream: str, source: str, fingerprint: str) -> bool:
        """Whether the daemon folded this registry folder before (merged or duplicate) with other contents."""
        return bool(self.rows("SELECT 1 FROM queue WHERE stream = ? AND source = ? AND fingerprint != ? AND state IN "
                              "('merged', 'duplicate') LIMIT 1", (stream, source, fingerprint)))

    def history(self, stream: str) -> tuple[PastCheckpoint, ...]:
        return tuple(PastCheckpoint(v.checkpoint, Path(v.source), v.metrics) for v in self.versions(stream))

    def update_norms(self, stream: str) -> list[float]:
        """Task-vector norms of the accepted checkpoints that were measured (for max_update_ratio)."""
        return [r["update_norm"] for r in self.rows("SELECT update_norm FROM versions WHERE stream = ? AND "
                                                   "update_norm IS NOT NULL ORDER BY version", (stream,))]

    def stream_row(self, stream: str) -> dict[str, Any] | None:
        rows = self.rows("SELECT * FROM streams WHERE name = ?", (stream,))
        return rows[0] if rows else None

    def rejections(self, stream: str) -> list[dict[str, Any]]:
        return self.rows("SELECT * FROM checkpoints WHERE stream = ? AND status = 'rejected' ORDER BY id", (stream,))

    # -- the daemon's queue and heartbeat (operational, outside the signed chain) ---------------------------
    def enqueue(self, stream: str, source: str, fingerprint: str, state: str = "pending") -> bool:
        """Queue an arrival once per (stream, source, fingerprint); whether it is new."""
        return bool(self.db.execute(
            "INSERT OR IGNORE INTO queue (stream, source, fingerprint, queued, state) VALUES (?, ?, ?, ?, ?)",
            (stream, source, fingerprint, utc_now(), state)).rowcount)

    def is_queued(self, stream: str, source: str) -> bool:
        return bool(self.rows("SELECT 1 FROM queue WHERE stream = ? AND source = ?", (stream, source)))

    def queued(self, state: str, limit: int | None = None) -> list[dict[str, Any]]:
        """Queue rows in ``state``, oldest first."""
        return self.rows("SELECT * FROM queue WHERE state = ? ORDER BY id" + (f" LIMIT {int(limit)}" if limit else ""),
                         (state,))

    def set_queued(self, item_id: int, state: str, result: str | None = None) -> None:
        if result is None:
            self.db.execute("UPDATE queue SET state = ? WHERE id = ?", (state, item_id))
        else:
            self.db.execute("UPDATE queue SET state = ?, result = ? WHERE id = ?", (state, result, item_id))

    def retry_failed(self) -> int:
        """Put failed arrivals back in line; how many."""
        return self.db.execute("UPDATE queue SET state = 'pending' WHERE state = 'failed'").rowcount

    def set_heartbeat(self, pid: int, status: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO heartbeat (id, pid, time, status) VALUES (1, ?, ?, ?)",
                        (pid, utc_now(), status))

    def publication_targets(self, stream: str, version: int) -> set[str]:
        return {str(self.located(r["target"])) for r in self.rows(
            "SELECT target FROM publications WHERE stream = ? AND version = ?", (stream, version))}

    def failed_arrivals(self, stream: str) -> list[dict[str, Any]]:
        """Queue items whose fold failed (not a rejection: an error, retried at the daemon's next start)."""
        return self.rows("SELECT * FROM queue WHERE stream = ? AND state = 'failed' ORDER BY id", (stream,))

    def events(self) -> list[dict[str, Any]]:
        return self.rows("SELECT * FROM events ORDER BY seq")

