"""A stream's folders on disk: ``output/vNNNN`` per version with a ``latest`` link, ``home/streams/NAME/state/vNNNN``
per state, and the spare state whose files the next fold overwrites. Each version folder appears atomically; one past
the ledger's head is a leftover of a crash, removed before the next fold."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from mergeops.model.writer import TEMP_MARKER

_VERSION_DIR = re.compile(r"^v(\d{4,})$")
# The newest pruned state, whose files the next fold's state overwrites instead of writing new files (not part of
# any version: a crash or a rejection may leave it consumed or half overwritten).
SPARE_STATE = ".spare"


def version_dir(root: Path, version: int) -> Path:
    return root / f"v{version:04d}"


@dataclass(frozen=True)
class StreamFolders:
    """Where one stream's versions and states live."""

    output: Path
    state_root: Path

    @classmethod
    def of(cls, home: Path, stream: str, output: Path) -> StreamFolders:
        return cls(output, home / "streams" / stream / "state")

    @property
    def spare_state(self) -> Path:
        return self.state_root / SPARE_STATE

    def remove_uncommitted(self, next_version: int) -> None:
        """Remove version folders at or past ``next_version`` and temp folders: leftovers of a crash."""
        for root in (self.output, self.state_root):
            if not root.is_dir():
                continue
            leftovers = [child for child in root.iterdir() if child.name.startswith(".") and TEMP_MARKER in child.name]
            leftovers += [folder for version, folder in _version_dirs(root) if version >= next_version]
            for child in leftovers:
                _remove(child)

    def point_latest(self, target: Path) -> None:
        """Atomically point ``output/latest`` at ``target`` (a version folder)."""
        link = self.output / "latest"
        tmp = self.output / f".latest{TEMP_MARKER}{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(target.name)
        os.replace(tmp, link)

    def latest(self) -> str | None:
        """The name of the version folder ``output/latest`` points at (None: no link)."""
        try:
            return os.readlink(self.output / "latest")
        except OSError:
            return None

    def prune(self, head: int, keep: int) -> None:
        """Keep the newest ``keep`` versions on disk, and only the head's state; the state before it becomes the
        spare. Outputs are removed, never recycled: a server may still have a pruned version's weights mapped."""
        for version, folder in _version_dirs(self.output):
            if version <= head - keep:
                _remove(folder)
        for version, folder in _version_dirs(self.state_root):
            if version == head - 1 and _is_folder(folder) and _cleared(self.spare_state):
                os.rename(folder, self.spare_state)
            elif version < head:
                _remove(folder)


def _is_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _remove(path: Path) -> None:
    """A folder with all it holds; a link or a file itself, never what a link points at (a link named like a version
    made every prune, after its version was committed, fail)."""
    shutil.rmtree(path) if _is_folder(path) else path.unlink()


def _cleared(path: Path) -> bool:
    """Remove the folder ``path`` if it is there; whether it is gone (a spare that cannot be replaced only costs
    the next fold some time, and must not fail a fold that is already committed)."""
    shutil.rmtree(path, ignore_errors=True)
    return not os.path.lexists(path)


def _version_dirs(root: Path) -> list[tuple[int, Path]]:
    return sorted((int(match.group(1)), child) for child in root.iterdir()
                  if (match := _VERSION_DIR.match(child.name)))
