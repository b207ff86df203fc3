"""Errors a user can act on. Each carries the process exit code of SPEC §3.

The message is one sentence naming the file, tensor or key and what to do; the CLI prints it to
stderr and exits with ``exit_code`` instead of showing a traceback.
"""

from __future__ import annotations


def shown(value: object) -> str:
    """``value`` as a message shows it: its repr, cut short (a value from a file may be long)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:50]}... ({len(text)} characters)"


class MergeopsError(Exception):
    """Base class: a problem the user can fix. Exit code 1 (a check found problems)."""

    exit_code = 1


class UsageError(MergeopsError):
    """Bad arguments, a bad policy file, or a key or setup the user must fix first. Exit code 2."""

    exit_code = 2


class PolicyError(UsageError):
    """The policy file is missing, malformed, or names something that does not exist."""


class ModelFolderError(MergeopsError):
    """A model folder cannot be read: missing, malformed, or refused (pickle, escaping paths)."""


class UntrustedFileError(ModelFolderError):
    """A file mergeops did not write was refused by the one door that reads such files (``mergeops.untrusted``)."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path} {reason}.")
        self.path, self.reason = str(path), reason


class RejectedError(MergeopsError):
    """A checkpoint was rejected by validation or a gate. Exit code 3."""

    exit_code = 3

    def __init__(self, message: str, gate: str = "validation") -> None:
        super().__init__(message)
        self.gate = gate


class DiskFullError(MergeopsError):
    """The disk holding the home or an output folder is full; the message says what the ledger shows was committed.
    Exit code 1."""


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` means the disk is full (ENOSPC/EDQUOT from the OS, or SQLite failing to write)."""
    import errno
    import sqlite3

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.OperationalError) and any(
        phrase in str(exc) for phrase in ("database or disk is full", "disk I/O error"))


def no_space(path: object, needed_bytes: int | None = None, *, committed: str | None = None) -> DiskFullError:
    """The one-sentence message for a full disk: where, how much is free, how much to free, and what was committed.

    ``committed``: what the ledger shows was recorded before the disk filled and what did not finish after it
    (e.g. "version 3 of stream 's' was committed, but `latest` still points at v0002"); None only when the ledger
    shows that nothing was."""
    import shutil

    try:
        free = shutil.disk_usage(path).free  # type: ignore[arg-type]
    except OSError:
        free = 0
    need = f"free about {max(1, -(-(needed_bytes - free) // 2**20))} MB" if needed_bytes else "free some space"
    where = f"no space left on {path} ({free / 2**20:.1f} MB free)"
    if committed is None:
        return DiskFullError(f"{where}: {need} and run again; nothing was committed.")
    return DiskFullError(f"{where}: {committed}; {need}.")


def full_disk_path(exc: BaseException, fallback: object) -> object:
    """The folder on the full disk: the one holding the file the failing call named, else ``fallback``."""
    import os

    for name in (getattr(exc, "filename2", None), getattr(exc, "filename", None)):
        if isinstance(name, str) and os.path.isabs(name):
            folder = os.path.dirname(name)
            while folder and not os.path.isdir(folder):
                folder = os.path.dirname(folder)
            return folder or fallback
    return fallback
