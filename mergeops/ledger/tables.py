"""The ledger's tables, their migrations, and how each event kind changes them.

Every history table is a projection of the event chain: rows are written only by ``apply`` in the
same transaction as their event, so ``audit`` can rebuild all of them from the events alone and
compare. Operational tables (``queue``, ``heartbeat``) are not history and stay outside the chain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlite_utils import Database, Migrations

from mergeops.ledger.events import Event, canonical

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


def _json(value: Any) -> str:
    return canonical(value)


def _checkpoint_row(event: Event, status: str) -> dict[str, Any]:
    p = event.payload
    c = p["checkpoint"]
    return {"id": event.seq, "stream": p["stream"], "digest": c.get("digest"), "source": c["source"],
            "arrived": c.get("arrived", event.time), "size": c.get("size"), "parameters": c.get("parameters"),
            "dtypes": _json(c.get("dtypes", {})), "metrics": _json(c.get("metrics", {})), "status": status,
            "gate": p.get("gate"), "reason": p.get("reason")}


def _stream_started(db: Database, event: Event) -> None:
    p = event.payload
    db["streams"].insert({"name": p["stream"], "base": p["base"], "base_digest": p["base_digest"],
                          "method": p["method"], "params": _json(p["params"]), "started": event.time})


def _checkpoint_rejected(db: Database, event: Event) -> None:
    db["checkpoints"].insert(_checkpoint_row(event, "rejected"))


def _version_committed(db: Database, event: Event) -> None:
    p = event.payload
    db["checkpoints"].insert(_checkpoint_row(event, "accepted"))
    db["versions"].insert({
        "stream": p["stream"], "version": p["version"], "method": p["method"], "params": _json(p["params"]),
        "previous": p["previous"], "checkpoint_id": event.seq, "checkpoint_digest": p["checkpoint"]["digest"],
        "output_digest": p["output_digest"], "path": p["path"], "state_path": p["state_path"],
        "state_digest": p["state_digest"], "files": _json(p["files"]), "gates": _json(p["gates"]),
        "policy_digest": p["policy_digest"], "tool": p["tool"], "update_norm": p.get("update_norm"),
        "eval": _json(p.get("eval", {})), "created": event.time, "pruned": 0, "cards": _json(p.get("cards", {}))})


def _version_pruned(db: Database, event: Event) -> None:
    p = event.payload
    db["versions"].update((p["stream"], p["version"]), {"pruned": 1})


def _protection_recorded(db: Database, event: Event) -> None:
    p = event.payload
    db["protections"].insert({"id": event.seq, "source_digest": p["source_digest"],
                              "output_digest": p["output_digest"], "path": p["path"],
                              "key_fingerprint": p["key_fingerprint"], "scheme": p["scheme"], "created": event.time})


def _publication_recorded(db: Database, event: Event) -> None:
    p = event.payload
    db["publications"].insert({"id": event.seq, "stream": p["stream"], "version": p["version"],
                               "output_digest": p["output_digest"], "target": p["target"], "signer": p["signer"],
                               "created": event.time, "files": _json(p.get("files", {}))})


APPLY: dict[str, Callable[[Database, Event], None]] = {
    "stream.started": _stream_started,
    "checkpoint.rejected": _checkpoint_rejected,
    "version.committed": _version_committed,
    "version.pruned": _version_pruned,
    "protection.recorded": _protection_recorded,
    "publication.recorded": _publication_recorded,
}


def apply(db: Database, event: Event) -> None:
    APPLY[event.kind](db, event)
