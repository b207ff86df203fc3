"""Taking in one checkpoint: open it, describe it, hash it in the background, check it against the base.

A :class:`Checkpoint` is what the pipeline hands from intake to the gates, the fold and the commit: the open model
folder, what the ledger records about it (:meth:`Checkpoint.facts`: source, arrival time, size, dtypes, its digests
once known) and its training metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeops.errors import ModelFolderError, RejectedError
from mergeops.intake.tokenizer import RowMatch
from mergeops.intake.validate import carried_from_base, problems_against_base
from mergeops.intake.vocab import tied_in_checkpoint, vocab_rows
from mergeops.ledger.kinds import CheckpointFacts
from mergeops.model import ModelFolder
from mergeops.model.digest import BackgroundDigest
from mergeops.model.folder import INDEX_FILE


@dataclass
class Checkpoint:
    """A checkpoint being taken in. Use as a context manager: leaving it stops the hashing and closes the folder."""

    folder: ModelFolder
    arrived: CheckpointFacts  # what was known on arrival: source, time, size, parameters, dtypes
    pending: BackgroundDigest
    metrics: dict[str, float] = field(default_factory=dict)
    mergelock: dict[str, Any] | None = None  # the marks of a MergeLock-protected checkpoint the policy allowed
    digests: tuple[str, str] | None = None  # the folder's and its weights' digests, once known
    carried: tuple[str, ...] = ()  # the base's buffers it leaves out (newer transformers do not save them)
    tied: dict[str, str] = field(default_factory=dict)  # base tensors it holds as its input embeddings: -> those
    rows: RowMatch | None = None  # its vocabulary rows matched to the base's by token string; None: by row index

    @property
    def path(self) -> Path:
        return self.folder.path

    @property
    def digest_known(self) -> bool:
        return self.digests is not None or self.pending.done()

    def digest(self, tick: Callable[[], None] | None = None) -> str:
        """The checkpoint's digest, waiting for it (calling ``tick`` about once a second)."""
        if self.digests is None:
            try:
                digest = self.pending.result(tick=tick)
            except ModelFolderError as exc:
                raise RejectedError(str(exc), gate="validation") from exc
            weights = [*self.folder.headers, *([INDEX_FILE] if self.folder.index is not None else [])]
            self.digests = (digest, self.pending.weights_digest(weights))
        return self.digests[0]

    def facts(self, *, with_metrics: bool = False) -> CheckpointFacts:
        """What the ledger records about the checkpoint: as it arrived, its digests if known, what gates found,
        and (in a version's record) its metrics."""
        digest, weights_digest = self.digests or (None, None)
        return dataclasses.replace(self.arrived, digest=digest, weights_digest=weights_digest, mergelock=self.mergelock,
                                   carried=self.carried or None, tied=self.tied or None,
                                   vocab_dropped=self.rows.dropped if self.rows is not None else None,
                                   metrics=self.metrics if with_metrics else None)

    def check_against_base(self, base: ModelFolder, vocab: str = "reject") -> None:
        """Rejects a checkpoint whose tensors do not match the base's (names, shapes, dtypes, config) or whose
        tokenizer is not the base's; notes the base's buffers it leaves out, which it is read as holding, the tensors
        it ties to its input embeddings, and how its vocabulary rows are matched to the base's (the stream's
        ``vocab`` setting)."""
        tied = tied_in_checkpoint(self.folder, base)
        problems = problems_against_base(self.folder, base, tied)
        if problems:
            raise RejectedError(problems[0].message)
        self.rows = vocab_rows(self.folder, base, tied, vocab)
        self.carried, self.tied = carried_from_base(self.folder, base), tied

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pending.__exit__(*exc)
        self.folder.close()


def receive(path: Path, arrived: CheckpointFacts) -> Checkpoint:
    """Open the checkpoint at ``path`` and start hashing it; ``arrived`` names its source and arrival time. Raises
    RejectedError (gate ``validation``) if it is not a readable model folder."""
    try:
        folder = ModelFolder.open(path)
    except ModelFolderError as exc:
        raise RejectedError(str(exc), gate="validation") from exc
    dtypes: dict[str, int] = {}
    for info in folder.tensors.values():
        dtypes[info.entry.dtype] = dtypes.get(info.entry.dtype, 0) + 1
    arrived = dataclasses.replace(arrived, size=sum(t.nbytes for t in folder.tensors.values()),
                                  parameters=sum(t.numel for t in folder.tensors.values()), dtypes=dtypes)
    return Checkpoint(folder, arrived, BackgroundDigest(path))
