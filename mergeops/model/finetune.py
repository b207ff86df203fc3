"""A checkpoint read as values of its base's tensors: what a fold streams, whatever form the checkpoint arrived in.

A full checkpoint stores every tensor (buffers newer transformers leave out are the base's; an output matrix tied to
its input embeddings is those; the rows of a vocabulary-sized tensor may be gathered from other rows, matched by
token); a LoRA adapter stores factors of a few updates (θ = θ0 + left @ right there, θ0 elsewhere). Either way the
fold asks for a tensor of the base, whole or as a piece of whole rows, and never sees the difference; a method that
can use an update's factors (OPCM) finds them on the stored tensor (:attr:`FineTuneTensor.factors`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeops.model.adapter import Adapter, is_adapter_folder
from mergeops.model.architectures import family_for, is_buffer, is_vocab
from mergeops.model.folder import ModelFolder
from mergeops.model.problems import Problem


@dataclass(frozen=True)
class FineTuneTensor:
    """One tensor of a fine-tune, not read yet (a :class:`~mergeops.model.Pieces`)."""

    finetune: FineTune
    name: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.finetune.base.tensors[self.name].shape

    @property
    def numel(self) -> int:
        return self.finetune.base.tensors[self.name].numel

    @property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(left, right)`` with the update θ − θ0 = left @ right (float32), if the checkpoint stores it so."""
        return self.finetune.factors(self.name)

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.finetune.read(self.name, start, stop)


class FineTune:
    """A checkpoint of ``base`` read tensor by tensor, by the base's tensor names."""

    path: Path
    base: ModelFolder
    carried: tuple[str, ...] = ()  # the base's tensors it leaves out and is read as holding (buffers)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The checkpoint's value of base tensor ``name`` (elements [start, stop) of it, flat, if given), in the dtype
        it is stored in (float32 where it is computed)."""
        raise NotImplementedError

    def stored(self, name: str) -> FineTuneTensor:
        return FineTuneTensor(self, name)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The update θ − θ0 of tensor ``name`` as low-rank factors ``(left, right)``, float32, if that is how the
        checkpoint stores it (zero-width ones where an adapter leaves the tensor alone); None for a dense update."""
        return None

    def file_of(self, name: str) -> str:
        """The file tensor ``name`` is read from, for messages."""
        raise NotImplementedError

    def nbytes(self, name: str) -> int:
        """About how many bytes reading tensor ``name`` reads (for progress)."""
        raise NotImplementedError

    def close(self) -> None:
        """Close the checkpoint's files (not the base's)."""

    def __enter__(self) -> FineTune:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FullFineTune(FineTune):
    """A full checkpoint; the base's buffers it leaves out (newer transformers do not save them) are the base's.

    ``tied`` maps base tensors the checkpoint stores once, tied to its input embeddings, to the tensor holding them.
    ``rows`` gives, per row of the base's vocabulary-sized tensors, the checkpoint's row of the same token (-1: a row
    no token of the base names, read as the base's); None reads every tensor row for row."""

    def __init__(self, folder: ModelFolder, base: ModelFolder, tied: Mapping[str, str] | None = None,
                 rows: Sequence[int] | None = None) -> None:
        self.folder, self.base, self.path = folder, base, folder.path
        self.carried = tuple(n for n in base.tensors if n not in folder.tensors and is_buffer(n))
        self.tied = dict(tied or {})
        self.rows = rows

    def _source(self, name: str) -> ModelFolder:
        return self.base if name in self.carried else self.folder

    def _stored(self, name: str) -> str:
        """The name the checkpoint stores base tensor ``name`` under."""
        return self.tied.get(name, name)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if self.rows is not None and is_vocab(name):
            return self._gathered(name, start, stop)
        return self._source(name).read(self._stored(name), start, stop)

    def _gathered(self, name: str, start: int, stop: int | None) -> torch.Tensor:
        """Elements [start, stop) of base tensor ``name`` (whole rows), each row the checkpoint's row of its token."""
        assert self.rows is not None
        shape = self.base.tensors[name].shape
        row = math.prod(shape[1:])
        whole = start == 0 and stop is None
        stop = math.prod(shape) if stop is None else stop
        if start % row or stop % row:
            raise ValueError(f"elements [{start}, {stop}) of {name!r} are not whole rows of {row} elements")
        stored = self._stored(name)
        dtype = self.folder.tensors[stored].dtype
        parts = [self.base.read(name, first * row, (first + count) * row).to(dtype) if source < 0
                 else self.folder.read(stored, source * row, (source + count) * row)
                 for first, source, count in _runs(self.rows, start // row, stop // row)]
        values = torch.cat(parts) if parts else torch.empty(0, dtype=dtype)
        return values.reshape(shape) if whole else values

    def file_of(self, name: str) -> str:
        return self._source(name).tensors[self._stored(name)].file

    def nbytes(self, name: str) -> int:
        return self._source(name).tensors[self._stored(name)].nbytes

    def close(self) -> None:
        self.folder.close()


def _runs(rows: Sequence[int], first: int, last: int) -> Iterator[tuple[int, int, int]]:
    """Rows [first, last) as runs ``(first row, its source row, count)`` whose sources are consecutive (or all -1):
    one read per run, not per row."""
    start = first
    for i in range(first + 1, last + 1):
        if i == last or not (rows[i] == rows[i - 1] + 1 >= 1 or rows[i] == rows[i - 1] == -1):
            yield start, rows[start], i - start
            start = i


class AdapterFineTune(FineTune):
    """A LoRA adapter: θ = θ0 + left @ right for the tensors it targets, θ0 for every other."""

    _CACHED = 4  # tensors whose factors are kept: the one being folded and those prepared ahead on worker threads

    def __init__(self, adapter: Adapter, base: ModelFolder) -> None:
        self.adapter, self.base, self.path = adapter, base, adapter.path
        self.family = family_for(base.config)  # which weights it stores [in, out] (GPT-2's Conv1D)
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # read once for all pieces of a tensor
        self._lock = threading.Lock()

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if name not in self.adapter.targets:
            shape = self.base.tensors[name].shape
            return (torch.zeros(shape[0], 0), torch.zeros(0, shape[1])) if len(shape) == 2 else None
        with self._lock:
            cached = self._factors.get(name)
        if cached is None:
            cached = self.adapter.factors(name, self.family)
            with self._lock:
                self._factors[name] = cached
                while len(self._factors) > self._CACHED:
                    del self._factors[next(iter(self._factors))]
        return cached

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        base = self.base.read(name, start, stop)
        if name not in self.adapter.targets:
            return base
        left, right = self.factors(name)
        columns = right.shape[1]
        if start % columns or (stop is not None and stop % columns):
            raise ValueError(f"elements [{start}, {stop}) of {name!r} are not whole rows of {columns} elements")
        rows = slice(start // columns, None if stop is None else stop // columns)
        return base.float().add_((left[rows] @ right).reshape(base.shape))

    def file_of(self, name: str) -> str:
        return self.adapter.folder.tensors[self.adapter.targets[name].a].file if name in self.adapter.targets \
            else self.base.tensors[name].file

    def nbytes(self, name: str) -> int:
        return self.base.tensors[name].nbytes

    def close(self) -> None:
        self.adapter.close()


def scan_checkpoint(path: str | Path) -> tuple[ModelFolder | Adapter | None, list[Problem]]:
    """The structure of a checkpoint folder (headers, configs; no values): a LoRA adapter if it has an adapter
    config, else a model folder; with its problems."""
    if is_adapter_folder(path):
        return Adapter.scan(path)
    return ModelFolder.scan(path)
