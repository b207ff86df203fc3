"""`mergeops lineage`: where did this model come from?

A target is ``STREAM``, ``STREAM@VERSION``, or the path of any model folder, found by its digest: a
merged version, a published copy (same digest as its version), or a protected copy (via the
protection record). The answer walks back from that version to the base, one folded checkpoint per step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergeops.errors import UsageError
from mergeops.ledger.store import Ledger
from mergeops.model import folder_digest


def resolve(ledger: Ledger, target: str) -> tuple[str, int, dict[str, Any]]:
    """(stream, version, how the target was found)."""
    path = Path(target)
    if path.is_dir():
        digest = folder_digest(path)
        found = {"path": str(path.resolve()), "digest": digest}
        rows = ledger._rows("SELECT stream, version FROM versions WHERE output_digest = ? ORDER BY version LIMIT 1",
                           (digest,))
        if rows:
            return rows[0]["stream"], rows[0]["version"], found | {"as": "version"}
        protected = ledger._rows("SELECT * FROM protections WHERE output_digest = ? LIMIT 1", (digest,))
        if protected:
            rows = ledger._rows("SELECT stream, version FROM versions WHERE output_digest = ? LIMIT 1",
                               (protected[0]["source_digest"],))
            if rows:
                return rows[0]["stream"], rows[0]["version"], found | {
                    "as": "protected copy", "protection": _protection(ledger, protected[0])}
        raise UsageError(f"{path} ({digest}) is not a model this ledger made, protected or published.")
    stream, _, number = target.partition("@")
    if ledger.stream_row(stream) is None:
        raise UsageError(f"{target!r} is neither a model folder nor a stream of this policy.")
    if number:
        if not number.isdigit():
            raise UsageError(f"{target!r}: the version after @ must be a number, e.g. {stream}@3.")
        version = int(number)
    else:
        head = ledger.head(stream)
        if head is None:
            raise UsageError(f"stream {stream!r} has no versions yet.")
        version = head.version
    if ledger.version(stream, version) is None:
        raise UsageError(f"stream {stream!r} has no version {version}.")
    return stream, version, {"as": "version"}


def _protection(ledger: Ledger, row: dict[str, Any]) -> dict[str, Any]:
    return {"output_digest": row["output_digest"], "path": str(ledger.located(row["path"])),
            "key_fingerprint": row["key_fingerprint"], "scheme": row["scheme"], "created": row["created"]}


def lineage(ledger: Ledger, target: str) -> dict[str, Any]:
    stream, version, found = resolve(ledger, target)
    stream_row = ledger.stream_row(stream) or {}
    signers = {r["seq"]: r["signer"] for r in ledger._rows("SELECT seq, signer FROM events")}
    steps = []
    for row in ledger._rows("SELECT * FROM versions WHERE stream = ? AND version <= ? ORDER BY version DESC",
                           (stream, version)):
        checkpoint = ledger._rows("SELECT * FROM checkpoints WHERE id = ?", (row["checkpoint_id"],))[0]
        steps.append({
            "version": row["version"], "output_digest": row["output_digest"], "path": str(ledger.located(row["path"])),
            "retained": not row["pruned"], "method": row["method"], "params": json.loads(row["params"]),
            "created": row["created"], "gates": json.loads(row["gates"]), "policy_digest": row["policy_digest"],
            "tool": row["tool"], "signer": signers.get(row["checkpoint_id"]),
            "checkpoint": {"digest": checkpoint["digest"], "source": checkpoint["source"],
                           "arrived": checkpoint["arrived"], "size": checkpoint["size"],
                           "parameters": checkpoint["parameters"], "metrics": json.loads(checkpoint["metrics"])},
        })
    output_digest = steps[0]["output_digest"]
    return {
        "target": target, "found": found, "stream": stream, "version": version,
        "base": {"source": stream_row.get("base"), "digest": stream_row.get("base_digest")},
        "steps": steps,
        "publications": [r | {"target": str(ledger.located(r["target"]))} for r in ledger._rows(
            "SELECT target, signer, created FROM publications WHERE stream = ? AND version = ?", (stream, version))],
        "protections": [_protection(ledger, r) for r in ledger._rows(
            "SELECT * FROM protections WHERE source_digest = ?", (output_digest,))],
    }
