"""One writer per home: the daemon, or a `mergeops fold` / `publish` run by hand, never two at once.

A writable :class:`~mergeops.ledger.store.Ledger` holds the lock from ``Ledger.open`` to ``close``, so every
caller that writes, the command line or a library call, is covered.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from mergeops.errors import UsageError

LOCK_FILE = "writer.lock"


class WriterLock:
    """An exclusive flock on ``home/writer.lock`` naming its holder; the kernel releases it if the holder dies."""

    def __init__(self, home: Path, role: str) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.path = home / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise UsageError(f"another mergeops {holder} writes to {home}; only one writer per home runs at a time "
                             "(drop checkpoints into the daemon's registry, or stop the daemon first).") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{role} (pid {os.getpid()})\n".encode(), 0)

    def release(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_held(home: Path) -> bool:
    """Whether a writer holds ``home``'s lock now, read from the kernel's list of locks (/proc/locks) rather than by
    trying the lock, which would make a writer starting at that moment fail. True where the list cannot be read:
    callers use it to wait for a writer, and waiting costs only time."""
    try:
        info = os.stat(Path(home) / LOCK_FILE)
    except FileNotFoundError:
        return False  # no writer has ever run in this home
    try:
        listing = Path("/proc/locks").read_text()
    except OSError:
        return True
    wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    return any(fields[1] == "FLOCK" and wanted in fields for fields in map(str.split, listing.splitlines())
               if len(fields) > 5)
