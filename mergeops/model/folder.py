"""Reading a Hugging Face style model folder one tensor at a time.

A folder holds ``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors`` named by
``model.safetensors.index.json``, plus config and tokenizer files. Shards are opened on first use;
each tensor is read on its own, so nothing ever needs the whole model in memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, runtime_checkable

import torch

from mergeops import untrusted
from mergeops.errors import ModelFolderError, UntrustedFileError
from mergeops.model.problems import Problem
from mergeops.model.safetensors_file import (
    SafetensorsHeader,
    TensorEntry,
    byte_view,
    parse_header,
    read_entry,
)

# Elements per piece when a tensor is handled in flat pieces: 1 MiB in float32, so a piece's working set stays
# in cache (measured fastest of 64K-1M elements for a 243M-parameter fold on a 2 MiB-L2 machine).
PIECE = 1 << 18
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Adam second moments beside a checkpoint's weights: written by intake (curvature import), read by OTA.
CURVATURE_FILE = "exp_avg_sq.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a model folder lives."""

    entry: TensorEntry
    file: str  # relative path of its shard

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def dtype(self) -> torch.dtype:
        return self.entry.torch_dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape

    @property
    def numel(self) -> int:
        return self.entry.numel

    @property
    def nbytes(self) -> int:
        return self.entry.nbytes


@runtime_checkable
class Pieces(Protocol):
    """Something a tensor's flat pieces can be read from: a stored tensor, or a value computed piece by piece."""

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class InMemory:
    """A tensor in memory, read whole or in flat pieces like a stored one."""

    tensor: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.tensor.reshape(-1)[start:stop] if start or stop is not None else self.tensor


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of an open model folder, not read yet: read it whole, or piece by piece."""

    folder: ModelFolder
    name: str

    @property
    def numel(self) -> int:
        return self.folder.tensors[self.name].numel

    @property
    def shape(self) -> tuple[int, ...]:
        return self.folder.tensors[self.name].shape

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.folder.read(self.name, start, stop)


def piece_bounds(shape: tuple[int, ...]) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of the consecutive flat pieces, about ``PIECE`` elements each, that make up a tensor of
    ``shape``; every piece is whole rows (a 2-D tensor's piece is a block of its rows)."""
    numel = math.prod(shape)
    if not numel:
        return
    row = numel // shape[0] if len(shape) > 1 else 1
    step = max(1, PIECE // row) * row
    for start in range(0, numel, step):
        yield start, min(start + step, numel)


class ModelFolder:
    """A readable model folder. Use :meth:`open` (raises on any structural problem) or
    :meth:`scan` (returns the problems so they can all be reported).

    >>> with ModelFolder.open("models/base") as model:
    ...     for name, tensor in model.iter_tensors():
    ...         ...
    """

    def __init__(self, path: Path, headers: dict[str, SafetensorsHeader], tensors: dict[str, TensorInfo],
                 index: dict[str, Any] | None) -> None:
        self.path = path
        self.headers = headers  # relative shard path -> parsed header, in shard order
        self.tensors = tensors  # name -> info, in shard then file order
        self.index = index
        self._fds: dict[str, int] = {}

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str], weights: str | None = None) -> ModelFolder:
        folder, problems = cls.scan(path, weights)
        if problems:
            more = f" (and {len(problems) - 1} more problem(s); run `mergeops inspect {path}`)" \
                if len(problems) > 1 else ""
            raise ModelFolderError(problems[0].message + more)
        assert folder is not None
        return folder

    @classmethod
    def scan(cls, path: str | os.PathLike[str], weights: str | None = None
             ) -> tuple[ModelFolder | None, list[Problem]]:
        """Read the folder's structure: index, shard headers, paths. Tensor values are not read.

        ``weights`` names one safetensors file of the folder to read instead of the model's weights
        (e.g. ``exp_avg_sq.safetensors``)."""
        root = Path(path)
        if not root.is_dir():
            return None, [Problem("not_a_folder", f"{root} is not a directory; give the path of a model "
                                  "folder (config.json plus model.safetensors or sharded safetensors).")]
        problems: list[Problem] = []
        index: dict[str, Any] | None = None
        if weights is not None:
            if not _present(root / weights):
                return None, [Problem("missing_file", f"{root} has no {weights}.", weights)]
            shard_names = [weights]
        elif _present(root / INDEX_FILE):
            index, shard_names, index_problems = _read_index(root)
            problems += index_problems
        elif _present(root / SINGLE_FILE):
            shard_names = [SINGLE_FILE]
        else:
            return None, [_missing_weights_problem(root)]

        headers: dict[str, SafetensorsHeader] = {}
        tensors: dict[str, TensorInfo] = {}
        for shard in shard_names:
            shard_path = root / shard
            escape = _escape_problem(root, shard, shard_path)
            if escape:
                problems.append(escape)
                continue
            if not _present(shard_path):
                problems.append(Problem("missing_shard", f"{shard} is named by {INDEX_FILE} but is not in "
                                        f"{root}; the checkpoint is incomplete, copy the missing shard.", shard))
                continue
            header, header_problems = parse_header(shard_path, shard)
            problems += header_problems
            if header is None:
                continue
            headers[shard] = header
            for entry in header.entries:
                if entry.name in tensors:
                    problems.append(Problem("duplicate_tensor", f"tensor {entry.name!r} appears in both "
                                            f"{tensors[entry.name].file} and {shard}; keep it in one shard only.",
                                            shard, entry.name))
                    continue
                tensors[entry.name] = TensorInfo(entry, shard)
        if index is not None:
            problems += _index_mismatches(index, tensors, headers)
        if not tensors and not problems:
            problems.append(Problem("no_tensors", f"{root} has weight files but no tensors in them.", None))
        config_problem = _read_config(root)[1]
        if config_problem is not None:
            problems.append(config_problem)
        return cls(root, headers, tensors, index), problems

    # -- reading -------------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any] | None:
        """``config.json`` (None when absent); :meth:`scan` has checked that it is a JSON object."""
        config, problem = _read_config(self.path)
        if problem is not None:
            raise ModelFolderError(problem.message)
        return config

    @property
    def architecture(self) -> str | None:
        config = self.config or {}
        archs = config.get("architectures")
        if isinstance(archs, list) and archs:
            return str(archs[0])
        model_type = config.get("model_type")
        return model_type if isinstance(model_type, str) else None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The tensor ``name`` as stored (its own dtype), read from disk now; with ``start`` or ``stop``, only
        elements [start, stop) of it, flattened (a piece: memory for the piece, not the tensor)."""
        try:
            info = self.tensors[name]
        except KeyError:
            raise ModelFolderError(f"tensor {name!r} is not in {self.path}.") from None
        return read_entry(self.fd(info.file), info.entry, start, stop)

    def stored(self, name: str) -> StoredTensor:
        """A handle on tensor ``name`` to read whole or in pieces later."""
        if name not in self.tensors:
            raise ModelFolderError(f"tensor {name!r} is not in {self.path}.")
        return StoredTensor(self, name)

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` one at a time, in file order unless ``names`` gives an order."""
        for name in self.tensors if names is None else names:
            yield name, self.read(name)

    def iter_file(self, shard: str, on_bytes: Callable[[bytes | memoryview], None] | None = None
                  ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the tensors of one shard in file order; ``on_bytes`` sees every byte of the file
        exactly once, in order, so a caller can hash the file while reading its tensors."""
        header = self.headers[shard]
        fd = self.fd(shard)
        if on_bytes:
            on_bytes(os.pread(fd, header.header_bytes, 0))
        for entry in header.entries:
            tensor = read_entry(fd, entry)
            if on_bytes:
                on_bytes(byte_view(tensor))
            yield entry.name, tensor

    def fd(self, shard: str) -> int:
        """The open descriptor of ``shard``, opened through the door on first use and kept until :meth:`close`."""
        fd = self._fds.get(shard)
        if fd is None:  # two threads may race here; the loser closes its descriptor
            opened = untrusted.open_fd(self.path / shard)
            fd = self._fds.setdefault(shard, opened)
            if fd != opened:
                os.close(opened)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ModelFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ModelFolder({str(self.path)!r}, tensors={len(self.tensors)})"


def _read_config(root: Path) -> tuple[dict[str, Any] | None, Problem | None]:
    """``config.json`` as a JSON object, or the problem with it: not UTF-8 JSON, not an object, or ``architectures``
    / ``model_type`` of the wrong kind (they decide whether a checkpoint fits its base)."""
    path = root / "config.json"
    if not _present(path):
        return None, None

    def problem(what: str) -> tuple[None, Problem]:
        return None, Problem("bad_config", f"{path} {what}; fix it or copy it again from the model's source.",
                             "config.json")

    try:
        config = untrusted.read_json(path)
    except UntrustedFileError as exc:
        return problem(exc.reason)
    if not isinstance(config, dict):
        return problem(f"is a JSON {type(config).__name__}, not an object")
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        return problem("has 'architectures' that is not a list of class names")
    if config.get("model_type") is not None and not isinstance(config["model_type"], str):
        return problem("has a 'model_type' that is not a string")
    return config, None


def _read_index(root: Path) -> tuple[dict[str, Any] | None, list[str], list[Problem]]:
    try:
        index = untrusted.read_json(root / INDEX_FILE)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
    except UntrustedFileError as exc:
        return None, [], [Problem("bad_index", f"{exc}", INDEX_FILE)]
    except (KeyError, TypeError) as exc:
        return None, [], [Problem("bad_index", f"{INDEX_FILE} in {root} cannot be read ({exc}); it must be "
                                  "JSON with a \"weight_map\" of tensor name to shard file.", INDEX_FILE)]
    shards = list(dict.fromkeys(weight_map.values()))
    return index, shards, []


def _present(path: Path) -> bool:
    """Whether anything is at ``path``: a FIFO or a dangling link where a file should be is there, to be refused by
    the door with its reason, not taken for a missing file."""
    return os.path.lexists(path)


def _escape_problem(root: Path, relative: str, path: Path) -> Problem | None:
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts:
        return Problem("path_escape", f"{INDEX_FILE} names {relative!r}, a path outside the model folder; "
                       "shard names must be plain file names inside the folder.", relative)
    if path.exists() and not path.resolve().is_relative_to(root.resolve()):  # a link anywhere on the way
        return Problem("path_escape", f"{relative} is a symlink to {path.resolve()}, outside the model "
                       "folder; replace it with a copy of the file.", relative)
    return None


def _index_mismatches(index: dict[str, Any], tensors: dict[str, TensorInfo],
                      headers: dict[str, SafetensorsHeader]) -> list[Problem]:
    problems = []
    for name, shard in index["weight_map"].items():
        if shard in headers and (name not in tensors or tensors[name].file != shard):
            problems.append(Problem("index_mismatch", f"{INDEX_FILE} says tensor {name!r} is in {shard} "
                                    "but that shard does not contain it; the checkpoint is inconsistent.",
                                    shard, name))
    for name, info in tensors.items():
        if name not in index["weight_map"]:
            problems.append(Problem("index_mismatch", f"tensor {name!r} in {info.file} is missing from "
                                    f"{INDEX_FILE}; regenerate the index.", info.file, name))
    return problems


def _missing_weights_problem(root: Path) -> Problem:
    try:
        entries = sorted(p.name for p in root.iterdir())
    except OSError as exc:
        return Problem("unreadable", f"{root} cannot be read ({exc.strerror}).")
    pickles = [n for n in entries if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        return Problem("pickle_weights", f"{root} has only pickle weights ({', '.join(pickles)}), which are "
                       "refused because loading pickle can execute arbitrary code; convert them to safetensors "
                       "(e.g. load with torch.load(weights_only=True) and save with "
                       "safetensors.torch.save_file, or `model.save_pretrained(dir, safe_serialization=True)`).",
                       pickles[0])
    visible = [n for n in entries if not n.startswith(".")]
    if not visible:
        return Problem("empty_folder", f"{root} is empty; a model folder needs model.safetensors "
                       "(or sharded safetensors with model.safetensors.index.json).")
    others = [n for n in visible if n.endswith(".safetensors")]
    hint = f" (found {', '.join(others)}: rename the weights to {SINGLE_FILE})" if others else ""
    return Problem("no_weights", f"{root} has no {SINGLE_FILE} and no {INDEX_FILE}{hint}.")
