"""The identity of a model folder (SPEC §3.1).

The digest is ``sha256:`` + the sha256 of a ``sha256sum``-style listing, one line per file sorted by
path bytes, so anyone can recompute it with coreutils::

    cd DIR && find -L . -type f ! -path './.git*' ! -path './.cache/*' ! -path ./model.sig \\
        ! -path ./README.md ! -path ./provenance.json | sed 's|^\\./||' | LC_ALL=C sort \\
        | xargs -d '\\n' sha256sum | sha256sum
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from mergeops import untrusted
from mergeops.errors import ModelFolderError

# Files that carry the digest or are regenerated from it, so they cannot be part of it.
EXCLUDED_TOP_LEVEL = frozenset({"model.sig", "README.md", "provenance.json"})
_CHUNK = 8 << 20


def is_digest_excluded(relative: str) -> bool:
    top = relative.split("/", 1)[0]
    return top.startswith(".git") or top == ".cache" or relative in EXCLUDED_TOP_LEVEL


def digest_files(root: Path) -> list[str]:
    """Relative paths (with ``/``) of the files the digest covers, sorted by their UTF-8 bytes.

    Symlinks are followed when they stay inside the folder and refused when they leave it, or when a link to a
    directory leads back to a directory on its own path (a loop, which ``find -L`` refuses too).
    """
    root = Path(root)
    if not root.is_dir():
        raise ModelFolderError(f"{root} is not a directory; give the path of a model folder.")
    resolved_root = root.resolve()
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        real = here.resolve()
        for name in dirnames:
            path = here / name
            if path.is_symlink() and (real == untrusted.resolved(path) or real.is_relative_to(path.resolve())):
                raise ModelFolderError(f"{path.relative_to(root).as_posix()} in {root} is a symlink loop (it leads "
                                       f"back to {path.resolve()}); remove it.")
        for name in list(dirnames) + filenames:
            path = here / name
            relative = path.relative_to(root).as_posix()
            if is_digest_excluded(relative):
                if name in dirnames:
                    dirnames.remove(name)
                continue
            if path.is_symlink():
                target = untrusted.resolved(path)
                if not target.is_relative_to(resolved_root):
                    raise ModelFolderError(
                        f"{relative} in {root} is a symlink to {target}, outside the model folder; "
                        "replace it with a copy of the file.")
            if name in filenames and _is_file(path):
                found.append(relative)
    found.sort(key=lambda p: p.encode())
    return found


def _is_file(path: Path) -> bool:
    """Whether the digest covers ``path``: a regular file (a dangling link is not one, as for ``find -L -type f``).
    A FIFO, socket or device is refused: hashing it would block or never end, leaving it out would hide it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    if not stat.S_ISDIR(mode):
        untrusted.require_regular(path, mode)
    return stat.S_ISREG(mode)


def file_sha256(path: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with untrusted.open_binary(path) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return digest.hexdigest()


def digest_of_listing(file_hashes: Mapping[str, str]) -> str:
    """The folder digest from ``{relative path: sha256 hex}`` of the covered files."""
    listing = "".join(f"{file_hashes[p]}  {p}\n" for p in sorted(file_hashes, key=lambda p: p.encode()))
    return "sha256:" + hashlib.sha256(listing.encode()).hexdigest()


def folder_file_hashes(root: Path, known: Mapping[str, str] | None = None,
                       progress: Callable[[int], None] | None = None) -> dict[str, str]:
    """sha256 of every covered file; hashes in ``known`` (computed while reading) are reused."""
    known = known or {}
    return {p: known.get(p) or file_sha256(Path(root) / p, progress) for p in digest_files(root)}


def folder_digest(root: Path) -> str:
    return digest_of_listing(folder_file_hashes(root))


class _Cancelled(Exception):
    pass


class BackgroundDigest:
    """A folder's digest computed on a worker thread while the caller gets on with other work.

    >>> with BackgroundDigest(path) as pending:
    ...     ...                      # read the folder, fold it
    ...     digest = pending.result()  # raises ModelFolderError as folder_digest would

    Leaving the ``with`` block early stops the hashing within one chunk.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeops-digest")
        self._future = self._pool.submit(self._compute)

    def _compute(self) -> str:
        def check_stop(_: int) -> None:
            if self._stop.is_set():
                raise _Cancelled
        self.file_hashes = folder_file_hashes(self.root, progress=check_stop)
        return digest_of_listing(self.file_hashes)

    def done(self) -> bool:
        return self._future.done()

    def weights_digest(self, weights_files: Iterable[str], also: Mapping[str, str] | None = None) -> str:
        """After :meth:`result`: the same recipe over the weights files alone (shards and index), which identifies
        the weights whatever other files (configs, training logs) were added to or removed from the folder; ``also``
        adds entries (name -> sha256 hex) for what the weights mean besides their bytes (an adapter's settings)."""
        return digest_of_listing({name: self.file_hashes[name] for name in weights_files} | dict(also or {}))

    def result(self, tick: Callable[[], None] | None = None) -> str:
        """Wait for the digest, calling ``tick`` about once a second meanwhile (e.g. to ping a watchdog)."""
        while True:
            try:
                return self._future.result(timeout=1.0)
            except FutureTimeout:
                if tick is not None:
                    tick()

    def __enter__(self) -> BackgroundDigest:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True)
