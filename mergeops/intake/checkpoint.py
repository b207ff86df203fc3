"""Taking in one checkpoint: open it, describe it, hash it in the background, check it against the base.

A checkpoint is a full model folder or a PEFT LoRA adapter of the stream's base. A :class:`Checkpoint` is what the
pipeline hands from intake to the gates, the fold and the commit: its weights' files, what the ledger records about
it (:meth:`Checkpoint.facts`: source, arrival time, size, dtypes, adapter settings, its digests once known), its
training metrics, and, once checked against the base, the checkpoint read as values of the base's tensors
(:attr:`Checkpoint.view`), which is what the fold streams.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeops.errors import ModelFolderError, RejectedError
from mergeops.intake.tokenizer import RowMatch
from mergeops.intake.validate import adapter_problems_against_base, problems_against_base
from mergeops.intake.vocab import adapter_tokenizer_problem, tied_in_checkpoint, vocab_rows
from mergeops.ledger.events import canonical
from mergeops.ledger.kinds import CheckpointFacts
from mergeops.model import ModelFolder
from mergeops.model.adapter import ADAPTER_CONFIG, Adapter, is_adapter_folder
from mergeops.model.digest import BackgroundDigest
from mergeops.model.finetune import AdapterFineTune, FineTune, FullFineTune
from mergeops.model.folder import INDEX_FILE


@dataclass
class Checkpoint:
    """A checkpoint being taken in. Use as a context manager: leaving it stops the hashing and closes the folder."""

    folder: ModelFolder  # its weights: the model's, or the adapter's factors
    arrived: CheckpointFacts  # what was known on arrival: source, time, size, parameters, dtypes
    pending: BackgroundDigest
    metrics: dict[str, float] = field(default_factory=dict)
    mergelock: dict[str, Any] | None = None  # the marks of a MergeLock-protected checkpoint the policy allowed
    digests: tuple[str, str] | None = None  # the folder's and its weights' digests, once known
    adapter: Adapter | None = None
    view: FineTune | None = None  # once checked against the base: the checkpoint as values of the base's tensors
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
            # an adapter's settings are part of its weights (its alpha scales every update); not its config's bytes,
            # which a re-save changes (key order, peft_version) without changing the adapter
            settings = {ADAPTER_CONFIG: hashlib.sha256(canonical(self.adapter.settings.summary()).encode()).hexdigest()
                        } if self.adapter is not None else None
            self.digests = (digest, self.pending.weights_digest(weights, settings))
        return self.digests[0]

    def facts(self, *, with_metrics: bool = False) -> CheckpointFacts:
        """What the ledger records about the checkpoint: as it arrived, its digests if known, what gates found,
        and (in a version's record) its metrics."""
        digest, weights_digest = self.digests or (None, None)
        carried = self.view.carried if self.view else ()
        tied = self.view.tied if isinstance(self.view, FullFineTune) else {}
        return dataclasses.replace(self.arrived, digest=digest, weights_digest=weights_digest, mergelock=self.mergelock,
                                   carried=carried or None, tied=tied or None,
                                   vocab_dropped=self.rows.dropped if self.rows is not None else None,
                                   metrics=self.metrics if with_metrics else None)

    def check_against_base(self, base: ModelFolder, vocab: str = "reject", tick: Callable[[], None] = lambda: None
                           ) -> FineTune:
        """Rejects a checkpoint that does not fit the base (tensor names, shapes, dtypes, config, tokenizer; an
        adapter's base and targets); returns it read as values of the base's tensors: buffers a full checkpoint
        leaves out are the base's, a head it ties is its input embeddings, and its vocabulary rows are matched to the
        base's as the stream's ``vocab`` setting says. ``tick()`` is called while its tokenizer is read (it may raise
        to stop)."""
        if self.adapter is not None:
            problems = adapter_problems_against_base(self.adapter, base)
            if problems:
                raise RejectedError(problems[0].message)
            tokenizer = adapter_tokenizer_problem(self.path, base, tick)
            if tokenizer:
                raise RejectedError(tokenizer)
            self.view = AdapterFineTune(self.adapter, base)
        else:
            self.view, self.rows = full_view(self.folder, base, vocab, tick)
        return self.view

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pending.__exit__(*exc)
        self.folder.close()


def full_view(folder: ModelFolder, base: ModelFolder, vocab: str, tick: Callable[[], None] = lambda: None
              ) -> tuple[FullFineTune, RowMatch | None]:
    """A full checkpoint read as values of the base's tensors, and how its vocabulary rows were matched; raises
    RejectedError if it does not fit the base."""
    tied = tied_in_checkpoint(folder, base)
    problems = problems_against_base(folder, base, tied)
    if problems:
        raise RejectedError(problems[0].message)
    match = vocab_rows(folder, base, tied, vocab, tick)
    return FullFineTune(folder, base, tied, match.rows if match is not None else None), match


def reopen(path: Path, base: ModelFolder, vocab: str) -> FineTune:
    """An earlier checkpoint read again as it was folded (MWA's window); raises ModelFolderError if it can no longer
    be read so, e.g. after the stream's ``vocab`` setting changed."""
    if is_adapter_folder(path):
        return AdapterFineTune(Adapter.open(path), base)
    folder = ModelFolder.open(path)
    try:
        return full_view(folder, base, vocab)[0]
    except RejectedError as exc:
        folder.close()
        raise ModelFolderError(str(exc)) from exc


def receive(path: Path, arrived: CheckpointFacts) -> Checkpoint:
    """Open the checkpoint at ``path`` (a model folder, or a LoRA adapter if it has ``adapter_config.json``) and
    start hashing it; ``arrived`` names its source and arrival time. Raises RejectedError (gate ``validation``) if it
    is not a readable model folder or adapter."""
    adapter = None
    try:
        if is_adapter_folder(path):
            adapter = Adapter.open(path)
            folder = adapter.folder
        else:
            folder = ModelFolder.open(path)
    except ModelFolderError as exc:
        raise RejectedError(str(exc), gate="validation") from exc
    dtypes: dict[str, int] = {}
    for info in folder.tensors.values():
        dtypes[info.entry.dtype] = dtypes.get(info.entry.dtype, 0) + 1
    arrived = dataclasses.replace(arrived, size=sum(t.nbytes for t in folder.tensors.values()),
                                  parameters=sum(t.numel for t in folder.tensors.values()), dtypes=dtypes,
                                  adapter=adapter.settings.summary() if adapter else None)
    return Checkpoint(folder, arrived, BackgroundDigest(path), adapter=adapter)
