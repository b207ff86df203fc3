"""A minimal durable record of versions and rejections per stream (one JSON file per stream).

This is the one interface the engine talks to; the signed SQLite ledger replaces its implementation.
Each write replaces the file atomically (temp file, fsync, rename), after the files a record points
to are already durable, so the record never names a folder that is not complete.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mergeops.fold.methods.base import PastCheckpoint


@dataclass(frozen=True)
class VersionRecord:
    version: int
    checkpoint: str  # digest of the checkpoint folded into this version
    source: str  # where it came from: a path, or hub repo@commit
    output: str
    output_digest: str
    state: str
    metrics: dict[str, float] = field(default_factory=dict)
    created: float = field(default_factory=time.time)


@dataclass(frozen=True)
class RejectionRecord:
    checkpoint: str | None
    source: str
    gate: str
    reason: str
    created: float = field(default_factory=time.time)


class Journal:
    def __init__(self, home: Path) -> None:
        self.home = Path(home)

    def _path(self, stream: str) -> Path:
        return self.home / "streams" / stream / "record.json"

    def _load(self, stream: str) -> dict[str, Any]:
        path = self._path(stream)
        if not path.exists():
            return {"versions": [], "rejections": [], "base_digest": None}
        return json.loads(path.read_text())

    def _save(self, stream: str, data: dict[str, Any]) -> None:
        path = self._path(stream)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def versions(self, stream: str) -> list[VersionRecord]:
        return [VersionRecord(**v) for v in self._load(stream)["versions"]]

    def head(self, stream: str) -> VersionRecord | None:
        versions = self.versions(stream)
        return versions[-1] if versions else None

    def version_with_checkpoint(self, stream: str, digest: str) -> VersionRecord | None:
        return next((v for v in self.versions(stream) if v.checkpoint == digest), None)

    def history(self, stream: str) -> tuple[PastCheckpoint, ...]:
        return tuple(PastCheckpoint(v.checkpoint, Path(v.source), v.metrics) for v in self.versions(stream))

    def rejections(self, stream: str) -> list[RejectionRecord]:
        return [RejectionRecord(**r) for r in self._load(stream)["rejections"]]

    def base_digest(self, stream: str) -> str | None:
        return self._load(stream)["base_digest"]

    def record_version(self, stream: str, record: VersionRecord, base_digest: str) -> None:
        data = self._load(stream)
        data["versions"].append(asdict(record))
        data["base_digest"] = base_digest
        self._save(stream, data)

    def record_rejection(self, stream: str, record: RejectionRecord) -> None:
        data = self._load(stream)
        data["rejections"].append(asdict(record))
        self._save(stream, data)
