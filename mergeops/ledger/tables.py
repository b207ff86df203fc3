"""The ledger's tables, their migrations, and how each event kind changes them.

Every history table is a projection of the event chain: rows are written only by ``apply`` in the
same transaction as their event, so ``audit`` can rebuild all of them from the events alone and
compare. Operational tables (``queue``, ``heartbeat``) are not history and stay outside the chain.
"""

from __future__ import annotations

from typing import Any

from sqlite_utils import Database, Migrations

from mergeops.ledger.events import Event, canonical
from mergeops.ledger.kinds import (
    CheckpointFacts,
    CheckpointRejected,
    ProtectionRecorded,
    StreamStarted,
    VersionCommitted,
    VersionPruned,
)

migrations = Migrations("mergeops.ledger")

# Tables whose every row is backed by events, with their primary keys.
HISTORY_TABLES: dict[str, tuple[str, ...]] = {
    "streams": ("name",),
    "checkpoints": ("id",),
    "versions": ("stream", "version"),
    "protections": ("id",),
    "publications": ("id",),
}


@migrations()
def create_tables(db: Database) -> None:
    db["events"].create({"seq": int, "time": str, "kind": str, "payload": str, "prev_hash": str, "hash": str,
                         "signer": str, "signature": str}, pk="seq")
    db["streams"].create({"name": str, "base": str, "base_digest": str, "method": str, "params": str,
                          "started": str}, pk="name")
    db["checkpoints"].create({"id": int, "stream": str, "digest": str, "source": str, "arrived": str, "size": int,
                              "parameters": int, "dtypes": str, "metrics": str, "status": str, "gate": str,
                              "reason": str}, pk="id")
    db["checkpoints"].create_index(["stream", "digest"])
    db["versions"].create({"stream": str, "version": int, "method": str, "params": str, "previous": int,
                           "checkpoint_id": int, "checkpoint_digest": str, "output_digest": str, "path": str,
                           "state_path": str, "state_digest": str, "files": str, "gates": str,
                           "policy_digest": str, "tool": str, "update_norm": float, "eval": str, "created": str,
                           "pruned": int},
                          pk=("stream", "version"), foreign_keys=[("checkpoint_id", "checkpoints", "id")])
    db["versions"].create_index(["output_digest"])
    db["protections"].create({"id": int, "source_digest": str, "output_digest": str, "path": str,
                              "key_fingerprint": str, "scheme": str, "created": str}, pk="id")
    db["protections"].create_index(["output_digest"])
    db["publications"].create({"id": int, "stream": str, "version": int, "output_digest": str, "target": str,
                               "signer": str, "created": str}, pk="id")
    db["queue"].create({"id": int, "stream": str, "source": str, "fingerprint": str, "queued": str, "state": str,
                        "result": str}, pk="id")
    db["queue"].create_index(["stream", "source", "fingerprint"], unique=True)
    db["heartbeat"].create({"id": int, "pid": int, "time": str, "status": str}, pk="id")


@migrations()
def m002_cards_and_published_files(db: Database) -> None:
    """Every file a version or publication consists of is recorded: the cards of a version (README.md and
    provenance.json name its digest, so they are outside it), and every file of a published copy."""
    db["versions"].add_column("cards", str)
    db["publications"].add_column("files", str)


@migrations()
def m003_adapters(db: Database) -> None:
    """A checkpoint that was a LoRA adapter has its settings (rows of older checkpoints, all full models, stay
    empty, as replaying their events leaves them)."""
    db["checkpoints"].add_column("adapter", str)


@migrations()
def m004_queue_attempts(db: Database) -> None:
    """The daemon counts the failed attempts at a queued arrival or publication (it quarantines one that keeps
    failing) and keeps the last failure's reason apart from the fold's result (a publication needs both)."""
    db["queue"].add_column("attempts", int, not_null_default=0)
    db["queue"].add_column("error", str)
    db.execute("UPDATE queue SET error = result, result = NULL WHERE state = 'failed'")


def _json(value: Any) -> str:
    return canonical(value)


def _checkpoint_row(event: Event, stream: str, c: CheckpointFacts, status: str, gate: str | None = None,
                    reason: str | None = None) -> dict[str, Any]:
    return {"id": event.seq, "stream": stream, "digest": c.digest, "source": c.source,
            "arrived": c.arrived or event.time, "size": c.size, "parameters": c.parameters,
            "dtypes": _json(c.dtypes or {}), "metrics": _json(c.metrics or {}), "status": status, "gate": gate,
            "reason": reason, "adapter": _json(c.adapter) if c.adapter else None}


def apply(db: Database, event: Event) -> None:
    """Change the history tables as ``event`` says (in the caller's transaction)."""
    e = event.typed()
    if isinstance(e, StreamStarted):
        db["streams"].insert({"name": e.stream, "base": e.base, "base_digest": e.base_digest, "method": e.method,
                              "params": _json(e.params), "started": event.time})
    elif isinstance(e, CheckpointRejected):
        db["checkpoints"].insert(_checkpoint_row(event, e.stream, e.checkpoint, "rejected", e.gate, e.reason))
    elif isinstance(e, VersionCommitted):
        db["checkpoints"].insert(_checkpoint_row(event, e.stream, e.checkpoint, "accepted"))
        db["versions"].insert({
            "stream": e.stream, "version": e.version, "method": e.method, "params": _json(e.params),
            "previous": e.previous, "checkpoint_id": event.seq, "checkpoint_digest": e.checkpoint.digest,
            "output_digest": e.output_digest, "path": e.path, "state_path": e.state_path,
            "state_digest": e.state_digest, "files": _json(e.files), "gates": _json(list(e.gates)),
            "policy_digest": e.policy_digest, "tool": e.tool, "update_norm": e.update_norm, "eval": _json(e.eval),
            "created": event.time, "pruned": 0, "cards": _json(e.cards)})
    elif isinstance(e, VersionPruned):
        db["versions"].update((e.stream, e.version), {"pruned": 1})
    elif isinstance(e, ProtectionRecorded):
        db["protections"].insert({"id": event.seq, "source_digest": e.source_digest, "output_digest": e.output_digest,
                                  "path": e.path, "key_fingerprint": e.key_fingerprint, "scheme": e.scheme,
                                  "created": event.time})
    else:
        db["publications"].insert({"id": event.seq, "stream": e.stream, "version": e.version,
                                   "output_digest": e.output_digest, "target": e.target, "signer": e.signer,
                                   "created": event.time, "files": _json(e.files)})
