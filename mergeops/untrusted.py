"""The one door for files mergeops did not write: a checkpoint's, an adapter's, a registry's, a published copy's.

Every such file is opened here and nowhere else (``tests/test_untrusted_door.py`` walks the package to keep it so):

- only a regular file is read, opened without blocking, so a FIFO, a socket or a device where a config should be
  is refused at once instead of stopping the process;
- its size is capped before it is read, and checked again while reading (a file that grows is refused);
- text must be UTF-8;
- JSON and TOML are parsed with limits: nesting depth, digits of an integer, a number that is not finite, a key
  given twice (parsers disagree on which one wins, so the file means two things).

Each refusal is an :class:`UntrustedFileError` whose message names the file and says what is wrong; callers turn
it into their own kind of error (a rejection, a problem of a folder, a policy error).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from mergeops.errors import UntrustedFileError

KiB, MiB = 1 << 10, 1 << 20
MAX_CONFIG_BYTES = 16 * MiB  # config.json, adapter_config.json, trainer_state.json, cards, index files
MAX_DEPTH = 64  # nesting of arrays and objects: real configs stay under 10
MAX_INT_DIGITS = 40  # an integer of more digits is no count, size or id of any model
_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder", stat.S_IFLNK: "a symlink"}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def open_fd(path: str | os.PathLike[str]) -> int:
    """A file descriptor of the regular file ``path`` (symlinks followed), opened read-only without blocking: a FIFO
    or device in its place is refused instead of blocking the process. The caller closes it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise UntrustedFileError(path, f"cannot be opened ({exc.strerror})") from exc
    try:
        require_regular(path, os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def require_regular(path: str | os.PathLike[str], mode: int) -> None:
    """Refuse ``path``, whose ``st_mode`` is ``mode``, unless it is a regular file, saying what it is instead."""
    if not stat.S_ISREG(mode):
        raise UntrustedFileError(path, f"is {_kind(mode)}, not a regular file; replace it with the file itself")


@contextmanager
def open_binary(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """The regular file ``path`` as a binary file object (see :func:`open_fd`)."""
    with os.fdopen(open_fd(path), "rb") as handle:
        yield handle


def read_bytes(path: str | os.PathLike[str], *, max_bytes: int = MAX_CONFIG_BYTES) -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes`` of them."""
    with open_binary(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:  # nothing to read: a kernel's file that says 0 bytes (/proc/kmsg) would block the read forever
            return b""
        if size > max_bytes:
            raise UntrustedFileError(path, f"is {size} bytes, larger than the {_size(max_bytes)} such a file may be")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UntrustedFileError(path, f"grew past {_size(max_bytes)} while it was read; it is still being written or "
                                 "is not what it claims to be")
    return data


def read_text(path: str | os.PathLike[str], *, max_bytes: int = MAX_CONFIG_BYTES) -> str:
    """The UTF-8 text of the regular file ``path``."""
    return decode_utf8(read_bytes(path, max_bytes=max_bytes), path)


def decode_utf8(data: bytes, path: str | os.PathLike[str]) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UntrustedFileError(path, f"is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc


def read_json(path: str | os.PathLike[str], *, max_bytes: int = MAX_CONFIG_BYTES, max_depth: int = MAX_DEPTH,
              finite: bool = True) -> Any:
    """The JSON document in the regular file ``path``, parsed with limits (see :func:`parse_json`)."""
    return parse_json(read_bytes(path, max_bytes=max_bytes), path, max_depth=max_depth, finite=finite)


def parse_json(data: bytes | str, path: str | os.PathLike[str], *, max_depth: int = MAX_DEPTH,
               finite: bool = True) -> Any:
    """Parse untrusted JSON: UTF-8, at most ``max_depth`` levels of nesting, integers of at most
    ``MAX_INT_DIGITS`` digits, finite numbers only, and no key twice in one object. ``path`` names it in errors.
    ``finite=False`` lets NaN and Infinity through (Python's json writes them: a Trainer's diverged loss), for a
    caller that refuses them itself where they matter, naming the key."""
    text = decode_utf8(data, path) if isinstance(data, bytes) else data
    try:
        document = json.loads(text, parse_int=_integer, parse_float=_finite_float if finite else float,
                              parse_constant=_no_constant if finite else float, object_pairs_hook=_unique_keys)
    except RecursionError as exc:
        raise UntrustedFileError(path, f"nests deeper than {max_depth} levels; it is not a file a model uses") from exc
    except _Refused as exc:
        raise UntrustedFileError(path, str(exc)) from exc
    except ValueError as exc:  # json.JSONDecodeError is one
        raise UntrustedFileError(path, f"is not valid JSON ({exc})") from exc
    _check_depth(document, max_depth, path)
    if _SURROGATE_ESCAPE.search(text) or not isinstance(data, bytes):
        _check_strings(document, path)
    return document


def read_toml(path: str | os.PathLike[str], *, max_bytes: int = 4 * MiB, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """The TOML document in the regular file ``path``, with the limits of :func:`parse_json`."""
    return parse_toml(read_bytes(path, max_bytes=max_bytes), path, max_depth=max_depth)


def parse_toml(data: bytes, path: str | os.PathLike[str], *, max_depth: int = MAX_DEPTH,
               finite: bool = True) -> dict[str, Any]:
    """Parse untrusted TOML (UTF-8) with the limits of :func:`parse_json`; ``path`` names it in errors.
    ``finite=False`` lets nan and inf through, for a caller that refuses them itself naming the key."""
    text = decode_utf8(data, path)
    try:
        document = tomllib.loads(text, parse_float=_toml_float if finite else float)
    except RecursionError as exc:
        raise UntrustedFileError(path, f"nests deeper than {max_depth} levels") from exc
    except _Refused as exc:
        raise UntrustedFileError(path, str(exc)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise UntrustedFileError(path, f"is not valid TOML ({exc})") from exc
    except ValueError as exc:  # int() refuses an integer of more than 4300 digits before our check can see it
        raise UntrustedFileError(path, f"holds an integer of more than {MAX_INT_DIGITS} digits") from exc
    _check_depth(document, max_depth, path)
    _check_toml_values(document, path)
    return document


class _Refused(ValueError):
    """A value the limits refuse; its message completes "<file> ..."."""


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"holds an integer of {len(text.lstrip('-'))} digits ({text[:20]}...); no setting of a model "
                       f"needs more than {MAX_INT_DIGITS}")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"holds the number {text[:40]}, which is not finite as a float")
    return value


def _no_constant(name: str) -> Any:
    raise _Refused(f"holds {name}, which is not a JSON number")


def _toml_float(text: str) -> float:
    if text.lstrip("+-") in ("inf", "nan"):
        raise _Refused(f"holds {text}, which is not a finite number")
    return _finite_float(text.replace("_", ""))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise _Refused(f"gives the key {twice[:80]!r} twice in one object; parsers disagree on which one counts, so "
                       "remove one")
    return document


def _check_depth(document: Any, max_depth: int, path: str | os.PathLike[str]) -> None:
    """Refuse nesting deeper than ``max_depth`` (iteratively: the check itself must not recurse)."""
    stack = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        if depth > max_depth:
            raise UntrustedFileError(path, f"nests deeper than {max_depth} levels; it is not a file a model uses")
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


# A \\uD800-\\uDFFF escape: JSON text decoded from UTF-8 holds no surrogate otherwise, so most files skip the walk.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _leaves(document: Any) -> Iterator[Any]:
    """Every key and scalar value of a parsed document (iteratively: a walk must not recurse)."""
    stack = [document]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        else:
            yield value


def _check_strings(document: Any, path: str | os.PathLike[str]) -> None:
    """Refuse a lone surrogate (``"\\ud800"``) in a key or string: it is no text, and it would fail later, far from
    here, when the string is encoded (into the ledger, a message, a file name)."""
    for value in _leaves(document):
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise UntrustedFileError(path, f"holds a lone surrogate ({value[exc.start]!r}) in the string "
                                         f"{value[:40]!r}, which is not text; save it as valid UTF-8") from exc


def _check_toml_values(document: Any, path: str | os.PathLike[str]) -> None:
    """TOML integers are unbounded and strings may hold NUL: refuse both where they would reach a path or a count."""
    for value in _leaves(document):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** MAX_INT_DIGITS:
            raise UntrustedFileError(path, f"holds an integer of more than {MAX_INT_DIGITS} digits")
        if isinstance(value, str) and "\x00" in value:
            raise UntrustedFileError(path, f"holds a NUL character in {value[:40]!r}; remove it")


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB" if n >= KiB else f"{n} bytes"


def is_regular(path: Path) -> bool:
    """Whether ``path`` is a regular file (symlinks followed), without opening it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def resolved(path: Path) -> Path:
    """``path`` with every symlink followed; a symlink loop (which ``Path.resolve`` raises as RuntimeError) is an
    :class:`UntrustedFileError` naming it."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:
        raise UntrustedFileError(path, "is a symlink loop (it leads back to itself); replace it with the file "
                                 "itself") from exc
