"""`mergeops status`: per stream what has been folded, rejected and is waiting, and is the daemon alive;
`mergeops rejections`: why; `mergeops retry`: quarantined items back in line."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from mergeops.ledger.store import QUARANTINED, Ledger, NoLedger, QueueItem
from mergeops.policy import Policy


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _failure(item: QueueItem, kind: str) -> dict[str, Any]:
    return {"time": item.queued, "stream": item.stream, "kind": kind, "checkpoint": item.source, "digest": None,
            "gate": None, "reason": item.error or item.result, "attempts": item.attempts}


def failures(policy: Policy, stream: str | None = None) -> list[dict[str, Any]]:
    """Every rejection, every failed arrival or publication (tried again at the daemon's next start) and every
    quarantined one, oldest first: when, which stream and checkpoint, which gate, why."""
    names = [policy.stream(stream).name] if stream is not None else list(policy.streams)
    try:
        ledger = Ledger.open_readonly(policy.home)
    except NoLedger:
        return []
    found = []
    with ledger:
        for name in names:
            found += [{"time": r.arrived, "stream": name, "kind": "rejected", "checkpoint": r.source,
                       "digest": r.digest, "gate": r.gate, "reason": r.reason, "attempts": None}
                      for r in ledger.rejections(name)]
            found += [_failure(q, "failed") for q in ledger.failed(name)]
            found += [_failure(q, QUARANTINED) for q in ledger.queued(QUARANTINED, stream=name)]
    return sorted(found, key=lambda f: f["time"] or "")


def status(policy: Policy) -> dict[str, Any]:
    """Readable while the daemon writes (WAL readers never block the writer)."""
    streams: dict[str, Any] = {}
    daemon: dict[str, Any] = {"running": False, "pid": None, "heartbeat_age_seconds": None, "status": None}
    try:
        ledger = Ledger.open_readonly(policy.home)
    except NoLedger:
        for name, stream in policy.streams.items():
            streams[name] = {"latest_version": None, "method": stream.method, "folded": 0, "rejected": 0,
                             "pending": 0, "failed": 0, "quarantined": 0, "last_event": None}
        return {"streams": streams, "daemon": daemon}
    with ledger:
        for name, stream in policy.streams.items():
            head = ledger.head(name)
            counts = ledger.counts(name)
            streams[name] = {
                "latest_version": head.version if head else None, "method": stream.method,
                "latest_output": head.output if head else None,
                "folded": counts.folded, "rejected": counts.rejected, "pending": counts.pending,
                "failed": counts.failed, "quarantined": counts.quarantined, "last_event": counts.last_event,
            }
        beat = ledger.heartbeat()
    if beat is not None:
        age = (datetime.now(UTC) - datetime.fromisoformat(beat.time)).total_seconds()
        daemon = {"running": _alive(beat.pid) and age < 120, "pid": beat.pid,
                  "heartbeat_age_seconds": round(age, 1), "status": beat.status}
    return {"streams": streams, "daemon": daemon}


def retry(policy: Policy, stream: str | None = None, checkpoint: str | None = None) -> list[dict[str, Any]]:
    """Put the quarantined folds and publications (of ``stream``, or of the ``checkpoint`` source, or all) back in
    line: the daemon tries each again at its next start, with a fresh count of attempts. What was put back."""
    name = policy.stream(stream).name if stream is not None else None
    try:
        Ledger.open_readonly(policy.home).close()  # says "no ledger yet" rather than creating one
    except NoLedger:
        return []
    sources = {checkpoint, os.path.abspath(checkpoint)} if checkpoint is not None else None  # as listed, or relative
    with Ledger(policy.home, None) as ledger:  # the queue only, outside the signed chain: no key, no writer lock
        return [_failure(item, "publication" if item.publication else "fold")
                for item in ledger.release_quarantined(name, sources)]
