"""Writing a model folder atomically, one tensor at a time.

The layout of every shard is fixed up front from the tensor specs, so each tensor is written straight
to its final offset as it arrives and never waits in memory for its neighbours. Everything goes into a
temporary sibling directory; files and directories are fsynced and then renamed into place in one
step, so a crash leaves either no output or a complete one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from mergeops import untrusted
from mergeops.durable import copy_durably, fsync_dir, start_writeback, write_durably
from mergeops.model.digest import file_sha256, is_digest_excluded
from mergeops.model.folder import INDEX_FILE, SINGLE_FILE
from mergeops.model.safetensors_file import byte_view, encode_header, write_at

DEFAULT_SHARD_BYTES = 5_000_000_000
WRITEBACK_EVERY = 32 << 20  # bytes written to a file between requests to start writing them to disk
TEMP_MARKER = ".tmp-"

# Files a donor folder holds that do not belong in a new model: weights and training leftovers (the
# card, provenance and signature are regenerated for every output and never copied).
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_NOT_CARRIED_NAMES = frozenset({INDEX_FILE, "pytorch_model.bin.index.json", "trainer_state.json",
                                "metrics.json"})


def carried_into_merge(relative: str) -> bool:
    """Whether a donor's file belongs in a new (merged) model: config, tokenizer, generation files; not weights,
    optimizer state or training leftovers."""
    name = relative.rsplit("/", 1)[-1]
    return name not in _NOT_CARRIED_NAMES and not name.endswith(WEIGHTS_SUFFIXES)


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor of the output will be: its name, storage dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class _HashWorker:
    """Feeds tensors' bytes to hash objects in order on one worker thread (hashlib releases the GIL).

    What waits is bounded: beyond ``max_bytes`` of waiting data (or ``max_jobs`` jobs), the writer waits for
    the oldest, so memory stays bounded by one tensor plus ``max_bytes``.
    """

    def __init__(self, max_bytes: int = 16 << 20, max_jobs: int = 256) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeops-hash")
        self._pending: deque[tuple[Future[None], int]] = deque()
        self._waiting_bytes = 0
        self._max_bytes, self._max_jobs = max_bytes, max_jobs

    def feed(self, hasher: Any, data: torch.Tensor) -> None:
        self.submit(lambda: hasher.update(byte_view(data)), data.numel() * data.element_size())

    def submit(self, job: Callable[[], None], nbytes: int = 0) -> None:
        self._pending.append((self._pool.submit(job), nbytes))
        self._waiting_bytes += nbytes
        while len(self._pending) > 1 and (self._waiting_bytes > self._max_bytes or
                                          len(self._pending) > self._max_jobs):
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        future, nbytes = self._pending.popleft()
        self._waiting_bytes -= nbytes
        future.result()

    def drain(self) -> None:
        while self._pending:
            self._wait_oldest()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _header(shard: list[TensorSpec], metadata: Mapping[str, str]) -> tuple[bytes, list[int]]:
    return encode_header([(s.name, s.dtype, s.shape) for s in shard], metadata)


def _hash_range(hasher: Any, fd: int, start: int, end: int, chunk: int = 8 << 20) -> None:
    while start < end:
        data = os.pread(fd, min(chunk, end - start), start)
        hasher.update(data)
        start += len(data)


def _plan_shards(specs: list[TensorSpec], shard_bytes: int,
                 group: Callable[[TensorSpec], str] | None) -> list[list[TensorSpec]]:
    """Greedy shards in spec order (keeps a layer together); a tensor above the cap gets its own, and tensors of
    different ``group`` never share a shard."""
    groups: dict[str, list[TensorSpec]] = {}
    for spec in specs:
        groups.setdefault(group(spec) if group else "", []).append(spec)
    shards: list[list[TensorSpec]] = []
    for members in groups.values():
        shards.append([])
        size = 0
        for spec in members:
            if shards[-1] and size + spec.nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
    # Within a shard, wider dtypes first keeps every tensor aligned to its element size.
    return [sorted(shard, key=lambda s: -s.dtype.itemsize) for shard in shards]


class ModelWriter:
    """Write a complete model folder at ``out``, atomically.

    >>> specs = [TensorSpec("w", torch.float32, (2, 2))]
    >>> with ModelWriter(out, specs, metadata={"k": "v"}, donor=base_dir) as writer:
    ...     writer.write("w", torch.eye(2))

    Tensors may be written in any order (``layout_order`` is fastest), whole (:meth:`write`) or as consecutive
    flat pieces (:meth:`write_piece`); each must match its spec. ``shard_group`` keeps tensors of different
    groups in different files (so that pieces of several tensors can be written at once, each file front to
    back). ``donor``'s config, tokenizer and generation files are copied; ``extra_files`` (e.g. a model card)
    are written beside the weights.
    On an exception inside the ``with`` block nothing appears at ``out``.

    With ``provisional_metadata`` the headers hold placeholders until :meth:`settle_metadata` gives the
    final values (of the same length, e.g. a digest still being computed); writing need not wait for them.

    With ``recycle``, a weights file of the same name in that folder is taken over (moved in, resized, every byte
    rewritten) instead of a new one created, if no other name links to it: overwriting a file's pages costs about
    half of writing a new file and freeing an old one (benchmarks/RESULTS.md). Only for files nobody else reads.

    With ``headers`` (file name -> complete safetensors header, length prefix included) the weights files are
    exactly those, each tensor at the place its header gives, instead of a layout of the writer's own: a model
    rewritten this way differs from its source only in the bytes that were changed. ``carry`` decides which of
    the donor's files are copied (by relative path). ``derived_files`` makes files from the others' hashes (a
    card naming the folder's digest) before the folder appears; they must be files the digest leaves out.
    """

    def __init__(self, out: str | os.PathLike[str], specs: Iterable[TensorSpec], *,
                 metadata: Mapping[str, str] | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 donor: str | os.PathLike[str] | None = None, hash_files: bool = True,
                 provisional_metadata: bool = False, shard_group: Callable[[TensorSpec], str] | None = None,
                 recycle: str | os.PathLike[str] | None = None, headers: Mapping[str, bytes] | None = None,
                 carry: Callable[[str], bool] = carried_into_merge,
                 derived_files: Callable[[dict[str, str]], dict[str, bytes]] | None = None) -> None:
        self.out = Path(out)
        self.recycle = Path(recycle) if recycle is not None else None
        self.specs = {s.name: s for s in specs}
        if not self.specs:
            raise ValueError("a model folder needs at least one tensor")
        self.metadata = {"format": "pt", **(metadata or {})}
        self.donor = Path(donor) if donor is not None else None
        self.carry = carry
        self.extra_files: dict[str, bytes] = {}
        # Files derived from the others' hashes (a card or provenance naming the digest), made last.
        self.derived_files = derived_files
        self.hash_files = hash_files
        self.file_hashes: dict[str, str] = {}  # relative path -> sha256 of every file written (if hash_files)
        # Weights written front to back are hashed as they go, on a worker thread so hashing overlaps the
        # next tensor's work; a file written out of order is re-read at the end.
        self._running: dict[str, tuple[Any, int]] = {}  # file -> (sha256 so far, offset it covers up to)
        # While metadata is provisional nothing can be hashed (the header comes first): file -> end of the
        # front-to-back written part, hashed from the page cache once the metadata is settled.
        self._unhashed: dict[str, int] | None = {} if provisional_metadata else None
        self._hashing = _HashWorker()
        self._tmp: Path | None = None
        self._fds: dict[str, int] = {}
        self._written: dict[str, int] = {}  # tensor -> elements written front to back so far
        self._not_written_back: dict[str, int] = {}  # file -> bytes written since its writeback was last started
        # The layout is fixed up front (file name -> its tensors; tensor -> file and offset), so the order to
        # write in is known before the first byte.
        self._mirrored = headers is not None
        self._headers: dict[str, bytes] = {}  # file -> header bytes
        self._sizes: dict[str, int] = {}  # file -> total length
        self._where: dict[str, tuple[str, int]] = {}
        if headers is not None:
            self._shards = {file_name: self._mirror(file_name, header) for file_name, header in headers.items()}
            if set(self._where) != set(self.specs):
                raise ValueError("the given headers do not place exactly the tensors of the specs")
            return
        shards = _plan_shards(list(self.specs.values()), shard_bytes, shard_group)
        names = [SINGLE_FILE] if len(shards) == 1 else [
            f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        self._shards = dict(zip(names, shards, strict=True))
        for file_name, shard in self._shards.items():
            header, offsets = _header(shard, self.metadata)
            self._headers[file_name] = header
            self._sizes[file_name] = offsets[-1] + shard[-1].nbytes
            for spec, offset in zip(shard, offsets, strict=True):
                self._where[spec.name] = (file_name, offset)

    def _mirror(self, file_name: str, header: bytes) -> list[TensorSpec]:
        """Take a given header's layout: where each tensor goes, checked against its spec."""
        entries = untrusted.parse_json(header[8:], f"the header given for {file_name}")
        entries.pop("__metadata__", None)
        shard = []
        for name, entry in entries.items():
            spec = self.specs.get(name)
            start, end = entry["data_offsets"]
            if spec is None or list(spec.shape) != entry["shape"] or end - start != spec.nbytes:
                raise ValueError(f"header of {file_name} places tensor {name!r} unlike its spec")
            self._where[name] = (file_name, len(header) + start)
            shard.append(spec)
        self._headers[file_name] = header
        self._sizes[file_name] = len(header) + max((e["data_offsets"][1] for e in entries.values()), default=0)
        return shard

    def __enter__(self) -> ModelWriter:
        if self.out.exists():
            raise FileExistsError(f"{self.out} already exists; model folders are never overwritten.")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}{TEMP_MARKER}", dir=self.out.parent))
        self._tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is meant to be read
        for file_name, header in self._headers.items():
            fd = self._open_weights_file(file_name)
            self._fds[file_name] = fd
            os.pwrite(fd, header, 0)
            os.ftruncate(fd, self._sizes[file_name])
            if self._unhashed is None:
                self._running[file_name] = (hashlib.sha256(header), len(header))
            else:
                self._unhashed[file_name] = len(header)
        if len(self._shards) > 1 and not self._mirrored:  # a mirrored layout's index is the donor's
            weight_map = {name: file for name, (file, _) in sorted(self._where.items())}
            index = {"metadata": {"total_size": sum(s.nbytes for s in self.specs.values())},
                     "weight_map": weight_map}
            self.extra_files[INDEX_FILE] = (json.dumps(index, indent=2) + "\n").encode()
        return self

    def _open_weights_file(self, file_name: str) -> int:
        """Open a new weights file in the temporary folder: a recyclable one moved in, or a new one. The header
        and the tensors cover every byte of it, so nothing of a recycled file's old content survives."""
        assert self._tmp is not None
        path = self._tmp / file_name
        if self.recycle is not None and _is_unshared_file(self.recycle / file_name):
            try:
                os.rename(self.recycle / file_name, path)
            except OSError:  # taken meanwhile, or on another file system: recycling only saves time
                pass
            else:
                return os.open(path, os.O_RDWR)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)

    @property
    def layout_order(self) -> list[str]:
        """Tensor names in the order they lie on disk: writing in this order is fastest."""
        return sorted(self._where, key=lambda name: self._where[name])

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the whole tensor ``name``."""
        spec = self._spec(name, tensor)
        if tuple(tensor.shape) != spec.shape:
            raise ValueError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                             f"expected {spec.dtype} {spec.shape}")
        self._write_flat(name, 0, tensor)

    def write_piece(self, name: str, start: int, values: torch.Tensor) -> None:
        """Write elements [start, start + len) of tensor ``name`` (flattened); its pieces come front to back."""
        self._spec(name, values)
        if start != self._written.get(name, 0):
            raise ValueError(f"piece of tensor {name!r} starts at element {start}, but "
                             f"{self._written.get(name, 0)} were written: pieces must come in order")
        self._write_flat(name, start, values)

    def _spec(self, name: str, values: torch.Tensor) -> TensorSpec:
        spec = self.specs.get(name)
        if spec is None:
            raise KeyError(f"tensor {name!r} is not part of this model's layout")
        if values.dtype != spec.dtype:
            raise ValueError(f"tensor {name!r} is {values.dtype}, expected {spec.dtype}")
        return spec

    def _write_flat(self, name: str, start: int, values: torch.Tensor) -> None:
        spec = self.specs[name]
        data = values.reshape(-1) if values.is_contiguous() else values.contiguous().reshape(-1)
        if start + data.numel() > spec.numel:
            raise ValueError(f"a piece of {data.numel()} elements at {start} overruns tensor {name!r} {spec.shape}")
        file_name, tensor_offset = self._where[name]
        offset = tensor_offset + start * spec.dtype.itemsize
        end = offset + data.numel() * spec.dtype.itemsize
        write_at(self._fds[file_name], data, offset)
        self._written[name] = start + data.numel()
        self._not_written_back[file_name] = self._not_written_back.get(file_name, 0) + end - offset
        if self._not_written_back[file_name] >= WRITEBACK_EVERY:  # the disk writes while the next pieces are made
            start_writeback(self._fds[file_name])
            self._not_written_back[file_name] = 0
        running = self._running.get(file_name)
        if self.hash_files and running is not None:
            if running[1] == offset:
                self._hashing.feed(running[0], data)
                self._running[file_name] = (running[0], end)
            else:
                del self._running[file_name]
        elif self._unhashed is not None and self._unhashed.get(file_name) == offset:
            self._unhashed[file_name] = end
        elif self._unhashed is not None:
            self._unhashed.pop(file_name, None)  # written out of order: re-read whole at the end

    @property
    def metadata_is_provisional(self) -> bool:
        return self._unhashed is not None

    def settle_metadata(self, metadata: Mapping[str, str]) -> None:
        """Replace provisional metadata by the final values and start hashing what is written so far."""
        if self._unhashed is None:
            raise RuntimeError("this writer's metadata is not provisional, or was settled already")
        final = {"format": "pt", **metadata}
        for file_name, shard in self._shards.items():
            header, offsets = _header(shard, final)
            if offsets != _header(shard, self.metadata)[1]:
                raise ValueError("settled metadata must encode to the provisional header's length")
            fd = self._fds[file_name]
            os.pwrite(fd, header, 0)
            written_to = self._unhashed.get(file_name)
            if self.hash_files and written_to is not None:
                hasher = hashlib.sha256(header)
                self._hashing.submit(lambda h=hasher, fd=fd, a=len(header), b=written_to: _hash_range(h, fd, a, b),
                                     written_to - len(header))
                self._running[file_name] = (hasher, written_to)
        self.metadata, self._unhashed = final, None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self._tmp is not None
        try:
            if exc_type is None:
                unwritten = sorted(n for n, s in self.specs.items() if self._written.get(n, 0) < s.numel)
                if unwritten:
                    raise RuntimeError(f"{len(unwritten)} tensor(s) were never written, or only in part, "
                                       f"e.g. {unwritten[0]!r}")
                self._finish(self._tmp)
        finally:
            self._hashing.close()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            if self._tmp.exists():
                shutil.rmtree(self._tmp, ignore_errors=True)

    def _finish(self, tmp: Path) -> None:
        if self._unhashed is not None:
            raise RuntimeError("the provisional metadata was never settled; call settle_metadata()")
        for fd in self._fds.values():
            os.fsync(fd)
        if self.hash_files:
            self._hashing.drain()
            for file_name in self._fds:
                running = self._running.get(file_name)
                complete = running is not None and running[1] == os.fstat(self._fds[file_name]).st_size
                self.file_hashes[file_name] = running[0].hexdigest() if complete else file_sha256(tmp / file_name)
        if self.donor is not None:
            _copy_carried_files(self.donor, tmp, self.carry)
        for relative, data in self.extra_files.items():
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            write_durably(tmp / relative, data)
        for path in sorted(tmp.rglob("*")):
            relative = path.relative_to(tmp).as_posix()
            if (self.hash_files and path.is_file() and relative not in self.file_hashes
                    and not is_digest_excluded(relative)):
                self.file_hashes[relative] = file_sha256(path)
        if self.derived_files is not None:
            for relative, data in self.derived_files(dict(self.file_hashes)).items():
                if not is_digest_excluded(relative):
                    raise ValueError(f"{relative} would change the folder digest it is derived from")
                write_durably(tmp / relative, data)
        for directory in [*sorted(p for p in tmp.rglob("*") if p.is_dir()), tmp]:
            fsync_dir(directory)
        os.rename(tmp, self.out)
        fsync_dir(self.out.parent)


def _is_unshared_file(path: Path) -> bool:
    """A regular file with no other hard link (a link elsewhere, e.g. a backup, would see it overwritten)."""
    try:
        info = os.lstat(path)
    except OSError:  # missing, or the folder is not one
        return False
    return stat.S_ISREG(info.st_mode) and info.st_nlink == 1


def write_tensor_file(out: Path, specs: list[TensorSpec], tensor_for: Callable[[TensorSpec], torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write one safetensors file atomically (temp file beside it, fsync, rename), asking for one tensor at
    a time; for single files that live inside a model folder, such as ``exp_avg_sq.safetensors``."""
    header, offsets = encode_header([(s.name, s.dtype, s.shape) for s in specs], {"format": "pt", **(metadata or {})})
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}{TEMP_MARKER}", dir=out.parent)
    try:
        os.pwrite(fd, header, 0)
        os.ftruncate(fd, len(header) + sum(s.nbytes for s in specs))
        for spec, offset in zip(specs, offsets, strict=True):
            tensor = tensor_for(spec)
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                raise ValueError(f"tensor {spec.name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                                 f"expected {spec.dtype} {spec.shape}")
            write_at(fd, tensor, offset)
        os.fsync(fd)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    fsync_dir(out.parent)
    return out


def _copy_carried_files(donor: Path, dest: Path, carry: Callable[[str], bool]) -> None:
    for path in sorted(donor.rglob("*")):
        relative = path.relative_to(donor).as_posix()
        if not path.is_file() or is_digest_excluded(relative) or not carry(relative):
            continue
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_durably(path, target)
