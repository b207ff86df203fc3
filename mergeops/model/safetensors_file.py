"""The safetensors format, read and written with positioned I/O.

Every header we read is validated by the reference parser, ``safetensors.safe_open`` (it reads the header only,
touching no data page): a header it refuses is never used. We also parse the header ourselves, because the
reference names only the first thing wrong and we want each problem as a precise sentence (which tensor, which
offset, truncated or corrupted), and because we need each tensor's byte offsets: we read each tensor with one
positioned read into memory the tensor owns. Memory-mapping would keep every touched page of the file resident in
our RSS until the file is closed; a positioned read keeps only the tensor being worked on.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from mergeops import untrusted
from mergeops.errors import UntrustedFileError
from mergeops.model.problems import Problem

# safetensors dtype names <-> torch dtypes. Unsigned wide ints exist in torch >= 2.3 only as storage.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024
_MAX_IO = 1 << 30  # Linux caps one read/write at just under 2 GiB; stay well below


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's header entry; ``start``/``end`` are absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one safetensors file: entries in file order, plus string metadata."""

    path: Path
    header_bytes: int  # 8-byte length prefix + JSON, i.e. where tensor data starts
    entries: tuple[TensorEntry, ...]
    metadata: Mapping[str, str]


def parse_header(path: Path, label: str) -> tuple[SafetensorsHeader | None, list[Problem]]:
    """Parse and check the header of ``path``. ``label`` is the name used in messages.

    Returns the header when the reference parser accepts it and the file can be read safely, and every problem
    found: a truncated file, offsets past the end or overlapping, sizes that disagree with shape and dtype,
    unknown dtypes, or whatever else the reference refuses.
    """

    def problem(code: str, message: str, tensor: str | None = None) -> Problem:
        return Problem(code, message, file=label, tensor=tensor)

    with ExitStack() as stack:
        try:  # a FIFO or device is refused here, before anything could block on it
            f = stack.enter_context(untrusted.open_binary(path))
        except UntrustedFileError as exc:
            return None, [problem("unreadable", f"{label} {exc.reason}.")]
        return _parse_open_header(f, path, label, problem)


def _parse_open_header(f: BinaryIO, path: Path, label: str, problem: Callable[..., Problem]
                       ) -> tuple[SafetensorsHeader | None, list[Problem]]:
    size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    if len(prefix) < 8:
        return None, [problem("truncated_file", f"{label} is truncated: it has {size} bytes, too few "
                              "for a safetensors header; copy the file again from its source.")]
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES:
        return None, [problem("bad_header", f"{label} declares a {n}-byte header, more than safetensors "
                              "allows; it is not a safetensors file or it is corrupted.")]
    if 8 + n > size:
        return None, [problem("truncated_file", f"{label} is truncated inside its header ({size} bytes, "
                              f"header needs {8 + n}); copy the file again from its source.")]
    raw = f.read(n)
    try:
        header = untrusted.parse_json(raw, f"the header of {label}")
    except UntrustedFileError as exc:
        return None, [problem("bad_header", f"{exc.path} {exc.reason.split(';')[0]}: it is not a safetensors file "
                              "or it is corrupted.")]
    if not isinstance(header, dict):
        return None, [problem("bad_header", f"{label} has a header that is not a JSON object.")]

    problems: list[Problem] = []
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        problems.append(problem("bad_header", f"{label} has __metadata__ that is not a map of strings."))
        metadata = {}

    data_start = 8 + n
    entries: list[TensorEntry] = []
    for name, info in header.items():
        entry = _parse_entry(name, info, data_start)
        if isinstance(entry, str):
            problems.append(problem("bad_header", f"{label}: tensor {name!r} {entry}.", name))
        else:
            entries.append(entry)
    entries.sort(key=lambda e: (e.start, e.end))

    position = data_start
    for e in entries:
        expected = e.numel * e.torch_dtype.itemsize
        if e.nbytes != expected:
            problems.append(problem("bad_header", f"{label}: tensor {e.name!r} occupies {e.nbytes} bytes but "
                                    f"shape {list(e.shape)} of {e.dtype} needs {expected}; the file is corrupted.",
                                    e.name))
        if e.start < position:
            problems.append(problem("overlapping_tensors", f"{label}: tensor {e.name!r} overlaps the tensor "
                                    "before it in the file; the header is corrupted.", e.name))
        elif e.start > position:
            problems.append(problem("bad_header", f"{label}: {e.start - position} unaccounted bytes before "
                                    f"tensor {e.name!r}; the header is corrupted.", e.name))
        position = max(position, e.end)
    if position > size:
        past = [e.name for e in entries if e.end > size]
        problems.append(problem("truncated_file", f"{label} is truncated: its header places tensor data up "
                                f"to byte {position} but the file has {size} bytes ({len(past)} tensor(s) "
                                f"past the end, first {past[0]!r}); copy the file again from its source.",
                                past[0]))
    elif position < size:
        problems.append(problem("bad_header", f"{label} has {size - position} bytes after the last tensor "
                                "that its header does not account for; the file is corrupted."))

    safe = not any(p.code in ("truncated_file", "overlapping_tensors") for p in problems)
    if not safe:
        return None, problems
    changed = problem("truncated_file", f"{label} changed while it was being read; if it is still being written, "
                      "wait until it is complete, else copy the file again from its source.")
    try:  # the reference opens the file we read, not whatever is at ``path`` now
        reference = _reference_header(Path(f"/proc/self/fd/{f.fileno()}"))
        resized = os.fstat(f.fileno()).st_size != size
    except OSError:  # replaced or removed since we read it
        return None, [changed]
    if isinstance(reference, str):
        if resized:
            return None, [changed]
        # Our own checks above name the tensor when they see what is wrong; otherwise say what the reference saw.
        return None, problems or [problem("bad_header", f"{label} is not a valid safetensors file (the "
                                          f"safetensors library says: {reference}); it is corrupted, copy the file "
                                          "again from its source.")]
    accepted, metadata = reference
    refused = {p.tensor for p in problems}
    if {name: seen for name, seen in accepted.items() if name not in refused} != {e.name: (e.dtype, e.shape)
                                                                                 for e in entries}:
        return None, [changed]  # the reference read another header than we did
    return SafetensorsHeader(path, data_start, tuple(entries), metadata), problems


def _reference_header(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]] | str:
    """``{name: (dtype, shape)}`` and the metadata of ``path`` as ``safetensors.safe_open`` reads them, or why it
    refuses the header. It checks the header length, UTF-8, JSON, dtypes, shapes and that the offsets tile the data
    exactly; it reads no tensor data."""
    try:
        with safe_open(path, framework="pt") as reference:
            slices = {name: reference.get_slice(name) for name in reference.keys()}  # noqa: SIM118 - not a dict
            return ({name: (s.get_dtype(), tuple(s.get_shape())) for name, s in slices.items()},
                    reference.metadata() or {})
    except SafetensorError as exc:
        return str(exc).removeprefix("Error while deserializing header: ")


def _parse_entry(name: str, info: object, data_start: int) -> TensorEntry | str:
    """A header entry, or a phrase saying what is wrong with it."""
    if not isinstance(info, dict):
        return "has a header entry that is not an object"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPES:
        return f"has unsupported dtype {dtype!r}"
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        return f"has an invalid shape {shape!r}"
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        return f"has invalid data_offsets {offsets!r}"
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def encode_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]
                  ) -> tuple[bytes, list[int]]:
    """The header bytes for tensors laid out in the given order, and each tensor's absolute offset."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    relative = 0
    relative_offsets = []
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [relative, relative + nbytes]}
        relative_offsets.append(relative)
        relative += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as safetensors itself writes
    start = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, [start + r for r in relative_offsets]


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy)."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


def read_entry(fd: int, entry: TensorEntry, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Read one tensor with positioned reads into a fresh tensor (no zero-fill, no extra copy); with ``start``
    or ``stop``, only elements [start, stop) of it, as a flat tensor."""
    itemsize = entry.torch_dtype.itemsize
    whole = start == 0 and stop is None
    first = entry.start + start * itemsize
    nbytes = (entry.numel if stop is None else stop) * itemsize - start * itemsize
    if start < 0 or first + nbytes > entry.end or nbytes < 0:
        raise IndexError(f"elements [{start}, {stop}) are outside tensor {entry.name!r} of {entry.numel}")
    raw = torch.empty(nbytes, dtype=torch.uint8)
    view = byte_view(raw)
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:done + _MAX_IO]], first + done)
        if got == 0:
            raise EOFError(f"unexpected end of file while reading tensor {entry.name!r}")
        done += got
    values = raw.view(entry.torch_dtype)
    return values.reshape(entry.shape) if whole else values


def write_at(fd: int, tensor: torch.Tensor, offset: int) -> None:
    """Write a tensor's bytes at ``offset`` with positioned writes."""
    view = byte_view(tensor if tensor.is_contiguous() else tensor.contiguous())
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:done + _MAX_IO], offset + done)
