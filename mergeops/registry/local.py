"""A local folder registry (SPEC §7): every immediate subfolder is one checkpoint.

Producers do not write atomically, so a checkpoint is taken only when it is complete: every shard the
index names exists, every safetensors header parses and the file length matches it, and nothing in
the folder changed for ``settle_seconds``, and the policy's completion ``marker`` file, if it names one, is
there (a file the producer writes last: a preallocated weights file looks complete before its bytes are
written). Names starting with ``.`` or ending in ``.tmp`` or
``.incomplete`` are ignored. A watchdog observer wakes the daemon on changes; a rescan catches the rest.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from mergeops.model.finetune import scan_checkpoint

IGNORED_SUFFIXES = (".tmp", ".incomplete")
# Problems that mean "still being written"; any other problem is a finished but bad checkpoint, which is
# taken so that its rejection is recorded.
_STILL_WRITING = frozenset({"truncated_file", "missing_shard", "empty_folder", "no_weights", "bad_index",
                            "missing_file"})  # missing_file: an adapter's weights, after its config


@dataclass(frozen=True)
class Candidate:
    path: Path
    fingerprint: str  # changes whenever any file in the folder changes
    settled_at: float  # when it became unchanged, by the newest modification time

    @property
    def source(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class Scan:
    ready: list[Candidate]  # complete and settled, oldest first
    changing: list[Path]  # modified within settle_seconds
    incomplete: list[Path]  # settled but missing shards or bytes: the producer stopped half-way (or is slow)


def is_ignored(name: str) -> bool:
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES)


def _newest_change(folder: Path) -> tuple[float, str]:
    """Newest modification time of the folder and everything in it, and a fingerprint of its files."""
    newest = folder.stat().st_mtime
    parts = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != ".cache"]
        for name in (*dirnames, *filenames):
            try:
                info = os.stat(os.path.join(dirpath, name))
            except FileNotFoundError:  # changing under us: not settled
                return time.time(), "changing"
            newest = max(newest, info.st_mtime)
            parts.append(f"{os.path.relpath(os.path.join(dirpath, name), folder)}:{info.st_size}:{info.st_mtime_ns}")
    return newest, "|".join(sorted(parts))


class LocalRegistry:
    def __init__(self, path: Path, settle_seconds: float, marker: str | None = None) -> None:
        self.path = Path(path)
        self.settle_seconds = settle_seconds
        self.marker = marker  # a file the producer writes last (COMMITTED, the Trainer's trainer_state.json)

    def scan(self, now: float | None = None) -> Scan:
        now = time.time() if now is None else now
        found = Scan([], [], [])
        if not self.path.is_dir():
            return found
        for folder in sorted(p for p in self.path.iterdir() if p.is_dir() and not is_ignored(p.name)):
            newest, fingerprint = _newest_change(folder)
            if now - newest < self.settle_seconds:
                found.changing.append(folder)
                continue
            _, problems = scan_checkpoint(folder)
            if any(p.code in _STILL_WRITING for p in problems) or (
                    self.marker is not None and not (folder / self.marker).is_file()):
                found.incomplete.append(folder)
                continue
            found.ready.append(Candidate(folder, fingerprint, newest))
        found.ready.sort(key=lambda c: (c.settled_at, c.source))
        return found

    def watch(self, wake: threading.Event) -> Observer | None:
        """Start a watchdog observer that sets ``wake`` on any change below the registry."""
        if not self.path.is_dir():
            return None

        class _Wake(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                wake.set()

        observer = Observer()
        observer.schedule(_Wake(), str(self.path), recursive=True)
        observer.daemon = True
        observer.start()
        return observer
