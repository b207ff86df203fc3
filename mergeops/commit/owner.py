"""Whose a folder is. Each stream's output folder and local publish folder carries a marker, ``.mergeops-owner.json``,
naming the home and the stream it belongs to, written when mergeops creates the folder. Nothing in such a folder is
written, replaced or pruned before it is found to be this home's folder of this stream, so a second home pointed at
it, or a folder mergeops did not create, loses nothing.

The marker lies beside the version folders (or published copies), not in them: it is part of no version's digest and
of no copy's files, and the audit's rollback check looks only at ``vNNNN`` names. A folder an older mergeops created
has no marker; it is adopted when it holds nothing but what this home's ledger records there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from mergeops.durable import fsync_dir, write_durably
from mergeops.errors import UntrustedFileError, UsageError
from mergeops.model.writer import TEMP_MARKER
from mergeops.untrusted import read_json

OWNER_FILE = ".mergeops-owner.json"
LATEST = "latest"  # the link in an output folder to its newest version


class NotOurFolder(UsageError):
    """A folder a policy names for mergeops to write belongs to another home or stream, or to nobody mergeops knows."""


@dataclass(frozen=True)
class Owner:
    """Who writes a folder: a stream of a home, as its versions (``output``) or its published copies (``publish``)."""

    home: Path
    stream: str
    role: str  # "output" or "publish"
    setting: str  # the policy key that names the folder, for messages: [streams.NAME].output

    def marker(self, folder: Path) -> dict[str, str]:
        # The home relative to the folder, as the ledger records paths: a home moved together with its folders
        # keeps them.
        return {"home": os.path.relpath(self.home.resolve(), folder.resolve()), "stream": self.stream,
                "role": self.role}


def claim(folder: Path, owner: Owner, recorded: Callable[[], Collection[str]]) -> None:
    """Make sure ``folder`` is ``owner``'s before anything in it is written or removed: created with its marker when
    it is missing or empty; taken when its marker names ``owner``; adopted (its marker written) when it has no marker
    and holds only entries ``recorded`` names (what this home's ledger records there) and, in an output folder, the
    ``latest`` link. Anything else raises :class:`NotOurFolder`, and nothing in the folder is touched."""
    untouched = f"give {owner.setting} a folder of its own (a new or empty one); nothing in {folder} was touched."
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise NotOurFolder(f"{folder} is not a folder mergeops can own (it is a file or a link); {untouched}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{folder} cannot be created ({exc.strerror}); give {owner.setting} a folder mergeops can "
                         "create.") from exc
    marker = folder / OWNER_FILE
    if os.path.lexists(marker):
        _check_marker(folder, owner, untouched)
        return
    for stale in folder.glob(f".{OWNER_FILE}{TEMP_MARKER}*"):  # a crash while it was written: that file is ours
        stale.unlink()
    entries = sorted(folder.iterdir())
    if entries:
        known = set(recorded())
        for entry in entries:
            ours = entry.name in known and entry.is_dir() and not entry.is_symlink()
            if not ours and not (owner.role == "output" and entry.name == LATEST and entry.is_symlink()):
                raise NotOurFolder(f"{folder} holds {entry.name!r}, which mergeops did not write there for stream "
                                   f"{owner.stream!r} of the home {owner.home}; {untouched}")
    tmp = folder / f".{OWNER_FILE}{TEMP_MARKER}{os.getpid()}"
    try:
        write_durably(tmp, json.dumps(owner.marker(folder), indent=1).encode() + b"\n")
        os.replace(tmp, marker)
    except BaseException:  # a full disk: the folder stays as it was
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)


def _check_marker(folder: Path, owner: Owner, untouched: str) -> None:
    try:
        found = read_json(folder / OWNER_FILE, max_bytes=64 << 10)
    except UntrustedFileError as exc:
        raise NotOurFolder(f"{folder}'s {OWNER_FILE} cannot be read ({exc.reason}), so whose the folder is is "
                           f"unknown; {untouched}") from exc
    if not isinstance(found, dict) or not all(isinstance(found.get(k), str) for k in ("home", "stream", "role")):
        raise NotOurFolder(f"{folder}'s {OWNER_FILE} does not name a home, stream and role; {untouched}")
    home = (folder.resolve() / found["home"]).resolve()
    if (home, found["stream"], found["role"]) != (owner.home.resolve(), owner.stream, owner.role):
        raise NotOurFolder(f"{folder} is the {found['role'][:20]} folder of stream {found['stream'][:64]!r} of the "
                           f"home {home} (its {OWNER_FILE} says so), not the {owner.role} folder of stream "
                           f"{owner.stream!r} of the home {owner.home}; {untouched}")
