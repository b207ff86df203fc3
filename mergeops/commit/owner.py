"""Whose a folder is. Each stream's output folder and local publish folder carries a marker, ``.mergeops-owner.json``,
naming the home (where it lies relative to the folder, and the home's id) and the stream it belongs to, written when
mergeops creates the folder. Nothing in such a folder is
written, replaced or pruned before it is found to be this home's folder of this stream, so a second home pointed at
it, or a folder mergeops did not create, loses nothing. The home's id, a random name in the home's ``home-id`` file
made with its first claim, tells the home from another one at the same place relative to the folder: a folder copied
without its home (into another project of the same layout) is refused by the home found there, not pruned as a crash's
leftovers.

The marker lies beside the version folders (or published copies), not in them: it is part of no version's digest and
of no copy's files, and the audit's rollback check looks only at ``vNNNN`` names. A folder an older mergeops created
has no marker; it is adopted when it holds nothing but what this home's ledger records there.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from mergeops.durable import fsync_dir, write_durably
from mergeops.errors import UntrustedFileError, UsageError
from mergeops.model.writer import TEMP_MARKER
from mergeops.untrusted import read_json, read_text

OWNER_FILE = ".mergeops-owner.json"
LATEST = "latest"  # the link in an output folder to its newest version
_MARKER_TEMP = f".{OWNER_FILE}{TEMP_MARKER}"
HOME_ID = "home-id"  # in the home: its id, which every marker it writes repeats


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
        return {"home": os.path.relpath(self.home.resolve(), folder.resolve()), "home_id": home_id(self.home),
                "stream": self.stream, "role": self.role}


def home_id(home: Path) -> str:
    """The home's id, made (random) with its first claim."""
    path = home / HOME_ID
    if not os.path.lexists(path):
        home.mkdir(parents=True, exist_ok=True)
        tmp = home / f".{HOME_ID}{TEMP_MARKER}{os.getpid()}"
        write_durably(tmp, secrets.token_hex(16).encode() + b"\n")
        try:
            os.link(tmp, path)  # never replaces an id another process made meanwhile: its markers name that one
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        fsync_dir(home)
    return read_text(path, max_bytes=1 << 10).strip()


def claim(folder: Path, owner: Owner, recorded: Callable[[], Collection[str]]) -> None:
    """Make sure ``folder`` is ``owner``'s before anything in it is written or removed: created with its marker when
    it is missing or empty; taken when its marker names ``owner``; adopted (its marker written) when it has no marker
    (or one from before homes had ids, naming ``owner``) and holds only entries ``recorded`` names (what this home's
    ledger records there) and, in an output folder, the ``latest`` link. Anything else raises
    :class:`NotOurFolder`, and nothing in the folder is touched."""
    untouched = f"give {owner.setting} a folder of its own (a new or empty one); nothing in {folder} was touched."
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise NotOurFolder(f"{folder} is not a folder mergeops can own (it is a file or a link); {untouched}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{folder} cannot be created ({exc.strerror}); give {owner.setting} a folder mergeops can "
                         "create.") from exc
    marker = folder / OWNER_FILE
    if os.path.lexists(marker) and _check_marker(folder, owner, untouched):
        return
    # a claim killed before its marker was renamed into place leaves the marker's temporary file: ours, removed below
    unfinished = [e for e in folder.iterdir() if e.name.startswith(_MARKER_TEMP) and _regular(e)]
    entries = sorted(entry for entry in folder.iterdir() if entry.name != OWNER_FILE and entry not in unfinished)
    if entries:
        known = set(recorded())
        for entry in entries:
            ours = entry.name in known and entry.is_dir() and not entry.is_symlink()
            if not ours and not (owner.role == "output" and entry.name == LATEST and entry.is_symlink()):
                raise NotOurFolder(f"{folder} holds {entry.name!r}, which mergeops did not write there for stream "
                                   f"{owner.stream!r} of the home {owner.home}; {untouched}")
    tmp = folder / f"{_MARKER_TEMP}{os.getpid()}"
    try:
        write_durably(tmp, json.dumps(owner.marker(folder), indent=1).encode() + b"\n")
        os.replace(tmp, marker)
    except BaseException:  # a full disk: the folder is left as it was
        tmp.unlink(missing_ok=True)
        raise
    for leftover in unfinished:
        leftover.unlink(missing_ok=True)
    fsync_dir(folder)


def _regular(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _check_marker(folder: Path, owner: Owner, untouched: str) -> bool:
    """Whether the folder's marker names ``owner``: True; False when it names it by a marker from before homes had
    ids (adopted like a folder without a marker); anything else raises :class:`NotOurFolder`."""
    try:
        found = read_json(folder / OWNER_FILE, max_bytes=64 << 10)
    except UntrustedFileError as exc:
        raise NotOurFolder(f"{folder}'s {OWNER_FILE} cannot be read ({exc.reason}), so whose the folder is is "
                           f"unknown; {untouched}") from exc
    if not isinstance(found, dict) or not all(isinstance(found.get(k), str) for k in ("home", "stream", "role")) \
            or not isinstance(found.get("home_id", ""), str):
        raise NotOurFolder(f"{folder}'s {OWNER_FILE} does not name a home, stream and role; {untouched}")
    home = (folder.resolve() / found["home"]).resolve()
    if (home, found["stream"], found["role"]) != (owner.home.resolve(), owner.stream, owner.role):
        raise NotOurFolder(f"{folder} is the {found['role'][:20]} folder of stream {found['stream'][:64]!r} of the "
                           f"home {home} (its {OWNER_FILE} says so), not the {owner.role} folder of stream "
                           f"{owner.stream!r} of the home {owner.home}; {untouched}")
    if "home_id" not in found:
        return False
    try:
        ours = home_id(owner.home)
    except UntrustedFileError as exc:
        raise NotOurFolder(f"the home {owner.home}'s {HOME_ID} cannot be read ({exc.reason}), so whether {folder} is "
                           f"its folder is unknown; {untouched}") from exc
    if found["home_id"] != ours:
        raise NotOurFolder(f"{folder} was written by another home that lay where {owner.home} lies (its {OWNER_FILE} "
                           f"names the home id {found['home_id'][:64]!r}, this home's is {ours!r}): a copy of another "
                           f"project's folder; {untouched}")
    return True
