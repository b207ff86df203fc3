"""Writing a model folder atomically, one tensor at a time.

The layout of every shard is fixed up front from the tensor specs, so each tensor is written straight
to its final offset as it arrives and never waits in memory for its neighbours. Everything goes into a
temporary sibling directory; files and directories are fsynced and then renamed into place in one
step, so a crash leaves either no output or a complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from mergeops.durable import fsync_dir, write_durably
from mergeops.model.digest import file_sha256, is_digest_excluded
from mergeops.model.folder import INDEX_FILE, SINGLE_FILE
from mergeops.model.safetensors_file import byte_view, encode_header, write_at

DEFAULT_SHARD_BYTES = 5_000_000_000
TEMP_MARKER = ".tmp-"

# Files a donor folder holds that do not belong in a new model: weights and training leftovers (the
# card, provenance and signature are regenerated for every output and never copied).
_NOT_CARRIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_NOT_CARRIED_NAMES = frozenset({INDEX_FILE, "pytorch_model.bin.index.json", "trainer_state.json",
                                "metrics.json"})


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor of the output will be: its name, storage dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


class _HashWorker:
    """Feeds tensors' bytes to hash objects in order on one worker thread (hashlib releases the GIL).

    At most ``depth`` tensors wait, so memory stays bounded by a few tensors.
    """

    def __init__(self, depth: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeops-hash")
        self._pending: deque[Future[None]] = deque()
        self._depth = depth

    def feed(self, hasher: Any, data: torch.Tensor) -> None:
        self.submit(lambda: hasher.update(byte_view(data)))

    def submit(self, job: Callable[[], None]) -> None:
        self._pending.append(self._pool.submit(job))
        while len(self._pending) > self._depth:
            self._pending.popleft().result()

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _header(shard: list[TensorSpec], metadata: Mapping[str, str]) -> tuple[bytes, list[int]]:
    return encode_header([(s.name, s.dtype, s.shape) for s in shard], metadata)


def _hash_range(hasher: Any, fd: int, start: int, end: int, chunk: int = 8 << 20) -> None:
    while start < end:
        data = os.pread(fd, min(chunk, end - start), start)
        hasher.update(data)
        start += len(data)


def _plan_shards(specs: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy shards in spec order (keeps a layer together); a tensor above the cap gets its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
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

    Tensors may be written in any order; each must match its spec. ``donor``'s config, tokenizer and
    generation files are copied; ``extra_files`` (e.g. a model card) are written beside the weights.
    On an exception inside the ``with`` block nothing appears at ``out``.

    With ``provisional_metadata`` the headers hold placeholders until :meth:`settle_metadata` gives the
    final values (of the same length, e.g. a digest still being computed); writing need not wait for them.
    """

    def __init__(self, out: str | os.PathLike[str], specs: Iterable[TensorSpec], *,
                 metadata: Mapping[str, str] | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 donor: str | os.PathLike[str] | None = None, hash_files: bool = True,
                 provisional_metadata: bool = False) -> None:
        self.out = Path(out)
        self.specs = {s.name: s for s in specs}
        if not self.specs:
            raise ValueError("a model folder needs at least one tensor")
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shard_bytes = shard_bytes
        self.donor = Path(donor) if donor is not None else None
        self.extra_files: dict[str, bytes] = {}
        # Files derived from the others' hashes (a card or provenance naming the digest), made last.
        self.finalize: Callable[[dict[str, str]], dict[str, bytes]] | None = None
        self.hash_files = hash_files
        self.file_hashes: dict[str, str] = {}  # relative path -> sha256 of every file written (if hash_files)
        # Weights written front to back are hashed as they go, on a worker thread so hashing overlaps the
        # next tensor's work; a file written out of order is re-read at the end.
        self._running: dict[str, tuple[Any, int]] = {}  # file -> (sha256 so far, offset it covers up to)
        # While metadata is provisional nothing can be hashed (the header comes first): file -> end of the
        # front-to-back written part, hashed from the page cache once the metadata is settled.
        self._unhashed: dict[str, int] | None = {} if provisional_metadata else None
        self._shards: dict[str, list[TensorSpec]] = {}
        self._hashing = _HashWorker()
        self._tmp: Path | None = None
        self._fds: dict[str, int] = {}
        self._where: dict[str, tuple[str, int]] = {}
        self._pending: set[str] = set()

    def __enter__(self) -> ModelWriter:
        if self.out.exists():
            raise FileExistsError(f"{self.out} already exists; model folders are never overwritten.")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}{TEMP_MARKER}", dir=self.out.parent))
        self._tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is meant to be read
        shards = _plan_shards(list(self.specs.values()), self.shard_bytes)
        names = [SINGLE_FILE] if len(shards) == 1 else [
            f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        for file_name, shard in zip(names, shards, strict=True):
            self._shards[file_name] = shard
            header, offsets = _header(shard, self.metadata)
            fd = os.open(self._tmp / file_name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            self._fds[file_name] = fd
            os.pwrite(fd, header, 0)
            os.ftruncate(fd, offsets[-1] + shard[-1].nbytes)
            if self._unhashed is None:
                self._running[file_name] = (hashlib.sha256(header), len(header))
            else:
                self._unhashed[file_name] = len(header)
            for spec, offset in zip(shard, offsets, strict=True):
                self._where[spec.name] = (file_name, offset)
        if len(names) > 1:
            weight_map = {name: file for name, (file, _) in sorted(self._where.items())}
            index = {"metadata": {"total_size": sum(s.nbytes for s in self.specs.values())},
                     "weight_map": weight_map}
            self.extra_files[INDEX_FILE] = (json.dumps(index, indent=2) + "\n").encode()
        self._pending = set(self.specs)
        return self

    @property
    def layout_order(self) -> list[str]:
        """Tensor names in the order they lie on disk: writing in this order is fastest."""
        return sorted(self._where, key=lambda name: self._where[name])

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs.get(name)
        if spec is None:
            raise KeyError(f"tensor {name!r} is not part of this model's layout")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                             f"expected {spec.dtype} {spec.shape}")
        file_name, offset = self._where[name]
        data = tensor.detach().cpu().contiguous().reshape(-1)
        write_at(self._fds[file_name], data, offset)
        self._pending.discard(name)
        running = self._running.get(file_name)
        if self.hash_files and running is not None:
            if running[1] == offset:
                self._hashing.feed(running[0], data)
                self._running[file_name] = (running[0], offset + spec.nbytes)
            else:
                del self._running[file_name]
        elif self._unhashed is not None and self._unhashed.get(file_name) == offset:
            self._unhashed[file_name] = offset + spec.nbytes
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
                self._hashing.submit(lambda h=hasher, fd=fd, a=len(header), b=written_to: _hash_range(h, fd, a, b))
                self._running[file_name] = (hasher, written_to)
        self.metadata, self._unhashed = final, None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self._tmp is not None
        try:
            if exc_type is None:
                if self._pending:
                    raise RuntimeError(f"{len(self._pending)} tensor(s) were never written, "
                                       f"e.g. {sorted(self._pending)[0]!r}")
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
            _copy_carried_files(self.donor, tmp)
        for relative, data in self.extra_files.items():
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            write_durably(tmp / relative, data)
        for path in sorted(tmp.rglob("*")):
            relative = path.relative_to(tmp).as_posix()
            if (self.hash_files and path.is_file() and relative not in self.file_hashes
                    and not is_digest_excluded(relative)):
                self.file_hashes[relative] = file_sha256(path)
        if self.finalize is not None:
            for relative, data in self.finalize(dict(self.file_hashes)).items():
                if not is_digest_excluded(relative):
                    raise ValueError(f"{relative} would change the folder digest it is derived from")
                write_durably(tmp / relative, data)
        for directory in [*sorted(p for p in tmp.rglob("*") if p.is_dir()), tmp]:
            fsync_dir(directory)
        os.rename(tmp, self.out)
        fsync_dir(self.out.parent)


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


def _copy_carried_files(donor: Path, dest: Path) -> None:
    for path in sorted(donor.rglob("*")):
        relative = path.relative_to(donor).as_posix()
        if (not path.is_file() or is_digest_excluded(relative) or path.name in _NOT_CARRIED_NAMES
                or path.name.endswith(_NOT_CARRIED_SUFFIXES)):
            continue
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        write_durably(target, path.read_bytes())
