"""`mergeops status`: per stream what has been folded, rejected and is waiting, and is the daemon alive."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from mergeops.ledger.store import LEDGER_FILE, Ledger
from mergeops.policy import Policy


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def failures(policy: Policy, stream: str | None = None) -> list[dict[str, Any]]:
    """Every rejection and every failed arrival, oldest first: when, which stream and checkpoint, which gate, why."""
    names = [policy.stream(stream).name] if stream is not None else list(policy.streams)
    if not (policy.home / LEDGER_FILE).is_file():
        return []
    found = []
    with Ledger.open_readonly(policy.home) as ledger:
        for name in names:
            found += [{"time": r["arrived"], "stream": name, "kind": "rejected", "checkpoint": r["source"],
                       "digest": r["digest"], "gate": r["gate"], "reason": r["reason"]}
                      for r in ledger.rejections(name)]
            found += [{"time": r["queued"], "stream": name, "kind": "failed", "checkpoint": r["source"],
                       "digest": None, "gate": None, "reason": r["result"]}
                      for r in ledger.failed_arrivals(name)]
    return sorted(found, key=lambda f: f["time"] or "")


def status(policy: Policy) -> dict[str, Any]:
    """Readable while the daemon writes (WAL readers never block the writer)."""
    streams: dict[str, Any] = {}
    daemon: dict[str, Any] = {"running": False, "pid": None, "heartbeat_age_seconds": None, "status": None}
    if not (policy.home / LEDGER_FILE).is_file():
        for name, stream in policy.streams.items():
            streams[name] = {"latest_version": None, "method": stream.method, "folded": 0, "rejected": 0,
                             "pending": 0, "failed": 0, "last_event": None}
        return {"streams": streams, "daemon": daemon}
    with Ledger.open_readonly(policy.home) as ledger:
        for name, stream in policy.streams.items():
            head = ledger.head(name)

            def count(sql: str, name: str = name) -> int:
                return ledger.rows(sql, (name,))[0]["n"]

            last = ledger.rows("SELECT max(time) AS t FROM events WHERE json_extract(payload, '$.stream') = ?",
                               (name,))[0]["t"]
            streams[name] = {
                "latest_version": head.version if head else None, "method": stream.method,
                "latest_output": head.output if head else None,
                "folded": count("SELECT count(*) AS n FROM versions WHERE stream = ?"),
                "rejected": count("SELECT count(*) AS n FROM checkpoints WHERE stream = ? AND status = 'rejected'"),
                "pending": count("SELECT count(*) AS n FROM queue WHERE stream = ? AND state = 'pending'"),
                "failed": len(ledger.failed_arrivals(name)),
                "last_event": last,
            }
        beat = ledger.rows("SELECT * FROM heartbeat WHERE id = 1")
    if beat:
        age = (datetime.now(UTC) - datetime.fromisoformat(beat[0]["time"])).total_seconds()
        daemon = {"running": _alive(beat[0]["pid"]) and age < 120, "pid": beat[0]["pid"],
                  "heartbeat_age_seconds": round(age, 1), "status": beat[0]["status"]}
    return {"streams": streams, "daemon": daemon}
