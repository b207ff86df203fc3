"""A local folder registry (SPEC §7): every immediate subfolder is one checkpoint.

Producers do not write atomically, so a checkpoint is taken only when it is complete: every shard the
index names exists, every safetensors header parses and the file length matches it, and nothing in
the folder changed for ``settle_seconds``, and the policy's completion ``marker`` file, if it names one, is
there (a file the producer writes last: a preallocated weights file looks complete before its bytes are
written). Names starting with ``.`` or ending in ``.tmp`` or
``.incomplete`` are ignored. A watchdog observer wakes the daemon on changes; a rescan catches the rest.

Any folder may be hostile, so each one is scanned on its own: a folder whose scan raises, takes longer than
``FOLDER_SECONDS`` or holds more than ``MAX_FOLDER_ENTRIES`` files and folders is refused (:class:`FolderRefused`),
and the scan goes on with the next. Symbolic links are never followed into folders.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from mergeops.isolated import Failed, TookTooLong, run_isolated
from mergeops.model.finetune import scan_checkpoint

IGNORED_SUFFIXES = (".tmp", ".incomplete")
# Problems that mean "still being written"; any other problem is a finished but bad checkpoint, which is
# taken so that its rejection is recorded.
_STILL_WRITING = frozenset({"truncated_file", "missing_shard", "empty_folder", "no_weights", "bad_index",
                            "missing_file"})  # missing_file: an adapter's weights, after its config
FOLDER_SECONDS = 30.0  # the time one folder's scan may take; a checkpoint's takes milliseconds
MAX_FOLDER_ENTRIES = 10_000  # files and folders in one checkpoint folder; a real one has a few dozen
_TICK_EVERY = 256  # entries walked between two calls of the scan's tick (stop? watchdog?)


def printable(path: str | os.PathLike[str]) -> str:
    """A path as text that JSON and SQLite take: bytes of a name that are not UTF-8 become ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Candidate:
    path: Path
    fingerprint: str  # changes whenever any file in the folder changes
    settled_at: float  # when it became unchanged, by the newest modification time

    @property
    def source(self) -> str:
        return printable(self.path)


class FolderRefused(Exception):
    """A registry folder that cannot be taken: its scan failed, took too long or found too much. It is not scanned
    again while its ``fingerprint`` (its files', or if they could not be listed, the folder's own) is unchanged."""

    def __init__(self, path: Path, fingerprint: str, reason: str) -> None:
        super().__init__(f"{printable(path)}: {reason}")
        self.path, self.fingerprint, self.reason = path, fingerprint, reason

    @property
    def source(self) -> str:
        return printable(self.path)


class _Unacceptable(Exception):
    """What makes a folder no checkpoint, said in a sentence (any other exception is named by its type)."""


@dataclass(frozen=True)
class Scan:
    ready: list[Candidate]  # complete and settled, oldest first
    changing: list[Path]  # modified within settle_seconds
    incomplete: list[Path]  # settled but missing shards or bytes: the producer stopped half-way (or is slow)
    refused: list[FolderRefused] = field(default_factory=list)  # in the order met


def is_ignored(name: str) -> bool:
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES)


@contextlib.contextmanager
def _refusing(folder: Path, fingerprint: str) -> Iterator[None]:
    """Any exception from reading ``folder`` (not a request to stop: that is no Exception) refuses it."""
    try:
        yield
    except _Unacceptable as exc:
        raise FolderRefused(folder, fingerprint, str(exc)) from exc
    except TookTooLong as exc:
        raise FolderRefused(folder, fingerprint, _overtime()) from exc
    except Failed as exc:
        raise FolderRefused(folder, fingerprint, str(exc)) from exc
    except Exception as exc:
        raise FolderRefused(folder, fingerprint, f"{type(exc).__name__}: {exc}") from exc


def _overtime() -> str:
    return f"its scan took longer than {FOLDER_SECONDS:g} s; a checkpoint's takes milliseconds"


def _problem_codes(folder: Path) -> list[str]:
    """What is wrong with the checkpoint in ``folder`` (run in a child process: only the codes travel back)."""
    return [problem.code for problem in scan_checkpoint(folder)[1]]


def _identity(folder: Path) -> str:
    """The folder's own fingerprint, for a folder whose files could not be listed: it changes when an entry of it is
    added, removed or renamed (one that cannot even be looked at: the error, which its walk meets again)."""
    try:
        info = folder.lstat()  # a link's own: it changes when the link is replaced, not when what it names does
    except FileNotFoundError:
        raise
    except OSError as exc:
        return f"unreadable:{exc.errno}"
    return f"folder:{info.st_ino}:{info.st_mtime_ns}:{info.st_ctime_ns}"


def _stat(entry: os.DirEntry[str]) -> os.stat_result | None:
    """A file's size and time, through a symbolic link (a dangling or looping link: the link's own); None if it is
    gone (being changed)."""
    try:
        return entry.stat()
    except OSError:  # gone, or a link that dangles or loops
        pass
    try:
        return entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None


def _newest_change(folder: Path, deadline: float, tick: Callable[[], None]) -> tuple[float, str]:
    """Newest modification time of the folder and everything in it, and a fingerprint of its files (``changing`` if
    one vanished while it was listed). Walked without recursion and without following links into folders, with
    ``tick()`` called every few hundred entries; more than ``MAX_FOLDER_ENTRIES`` entries, or past ``deadline``, or
    a name that is not UTF-8, refuses it."""
    newest = folder.stat().st_mtime
    parts: list[str] = []
    prefix = len(os.fspath(folder)) + 1
    below = [os.fspath(folder)]
    while below:
        try:
            listing = os.scandir(below.pop())
        except FileNotFoundError:  # removed while we walk: not settled
            return time.time(), "changing"
        with listing:
            for entry in listing:
                if entry.name == ".cache":  # huggingface_hub's download state, not the checkpoint
                    continue
                if len(parts) % _TICK_EVERY == 0:
                    tick()
                    if time.monotonic() > deadline:
                        raise _Unacceptable(_overtime())
                if len(parts) >= MAX_FOLDER_ENTRIES:
                    raise _Unacceptable(f"it holds more than {MAX_FOLDER_ENTRIES} files and folders; a checkpoint "
                                        "has a few dozen")
                relative = entry.path[prefix:]
                if printable(relative) != relative:
                    raise _Unacceptable(f"{printable(relative)!r} has a name that is not UTF-8; rename it")
                info = _stat(entry)
                if info is None:
                    return time.time(), "changing"
                newest = max(newest, info.st_mtime)
                parts.append(f"{relative}:{info.st_size}:{info.st_mtime_ns}")
                if entry.is_dir(follow_symlinks=False):
                    below.append(entry.path)
    return newest, "|".join(sorted(parts))


class LocalRegistry:
    def __init__(self, path: Path, settle_seconds: float, marker: str | None = None) -> None:
        self.path = Path(path)
        self.settle_seconds = settle_seconds
        self.marker = marker  # a file the producer writes last (COMMITTED, the Trainer's trainer_state.json)

    def scan(self, known: AbstractSet[tuple[str, str]] = frozenset(), tick: Callable[[], None] = lambda: None,
             now: float | None = None) -> Scan:
        """Every folder's state, but those whose (source, fingerprint) is ``known``: queued (or refused) before with
        these contents. ``tick()`` is called between folders and often within one (it may raise to stop)."""
        now = time.time() if now is None else now
        found = Scan([], [], [])
        if not self.path.is_dir():
            return found
        for folder in sorted(p for p in self.path.iterdir() if p.is_dir() and not is_ignored(p.name)):
            tick()
            try:
                state, candidate = self.examine(folder, known, tick, now)
            except FolderRefused as refused:
                found.refused.append(refused)
                continue
            except FileNotFoundError:  # removed since it was listed
                continue
            if state == "ready" and candidate is not None:
                found.ready.append(candidate)
            elif state == "changing":
                found.changing.append(folder)
            elif state == "incomplete":
                found.incomplete.append(folder)
        found.ready.sort(key=lambda c: (c.settled_at, c.source))
        return found

    def examine(self, folder: Path, known: AbstractSet[tuple[str, str]], tick: Callable[[], None], now: float
                ) -> tuple[Literal["known", "changing", "incomplete", "ready"], Candidate | None]:
        """One folder's state (and as a candidate, if it is ready), within ``FOLDER_SECONDS``."""
        deadline = time.monotonic() + FOLDER_SECONDS
        source, identity = printable(folder), _identity(folder)
        if (source, identity) in known:
            return "known", None
        with _refusing(folder, identity):
            if source != str(folder):
                raise _Unacceptable("its name is not UTF-8; rename it")
            if folder.is_symlink():  # it could lead anywhere: /proc, another stream's output, the home
                raise _Unacceptable(f"it is a symbolic link (to {printable(os.readlink(folder))}), which is not "
                                    "followed into a folder; put the checkpoint itself in the registry")
            newest, fingerprint = _newest_change(folder, deadline, tick)
        if (source, fingerprint) in known:
            return "known", None
        if now - newest < self.settle_seconds:
            return "changing", None
        with _refusing(folder, fingerprint):
            # the checkpoint's own files (headers, configs) are read in a child process, killed at the deadline or
            # when the scan is stopped: no input can hold the scan longer
            codes = run_isolated(_problem_codes, (folder,), tick, max(deadline - time.monotonic(), 0.0))
        if any(code in _STILL_WRITING for code in codes) or (
                self.marker is not None and not (folder / self.marker).is_file()):
            return "incomplete", None
        return "ready", Candidate(folder, fingerprint, newest)

    def watch(self, wake: threading.Event, recursive: bool = True) -> Observer | None:
        """Start a watchdog observer that sets ``wake`` on any change below the registry (or only in it: starting a
        recursive one walks the whole tree, which a hostile folder can make fail)."""
        if not self.path.is_dir():
            return None

        class _Wake(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                wake.set()

        observer = Observer()
        observer.schedule(_Wake(), str(self.path), recursive=recursive)
        observer.daemon = True
        observer.start()
        return observer
