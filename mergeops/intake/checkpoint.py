"""Taking in one checkpoint: open it, describe it, hash it in the background, check it against the base.

A :class:`Checkpoint` is what the pipeline hands from intake to the gates, the fold and the commit: the open model
folder, the facts the ledger records about it (``facts``: source, arrival time, size, dtypes, and its digests once
known), and its training metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeops.errors import ModelFolderError, RejectedError
from mergeops.intake.validate import problems_against_base
from mergeops.model import ModelFolder
from mergeops.model.digest import BackgroundDigest
from mergeops.model.folder import INDEX_FILE


@dataclass
class Checkpoint:
    """A checkpoint being taken in. Use as a context manager: leaving it stops the hashing and closes the folder."""

    folder: ModelFolder
    facts: dict[str, Any]  # what the ledger records about the checkpoint
    pending: BackgroundDigest
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.folder.path

    @property
    def digest_known(self) -> bool:
        return "digest" in self.facts or self.pending.done()

    def digest(self, tick: Callable[[], None] | None = None) -> str:
        """The checkpoint's digest, waiting for it (calling ``tick`` about once a second); its weights digest is then
        in ``facts`` too."""
        if "digest" not in self.facts:
            try:
                self.facts["digest"] = self.pending.result(tick=tick)
            except ModelFolderError as exc:
                raise RejectedError(str(exc), gate="validation") from exc
            weights = [*self.folder.headers, *([INDEX_FILE] if self.folder.index is not None else [])]
            self.facts["weights_digest"] = self.pending.weights_digest(weights)
        return self.facts["digest"]

    def check_against_base(self, base: ModelFolder) -> None:
        """Rejects a checkpoint whose tensors do not match the base's (names, shapes, dtypes, config)."""
        problems = problems_against_base(self.folder, base)
        if problems:
            raise RejectedError(problems[0].message)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pending.__exit__(*exc)
        self.folder.close()


def receive(path: Path, facts: dict[str, Any]) -> Checkpoint:
    """Open the checkpoint at ``path`` and start hashing it; ``facts`` holds at least its source and arrival time.
    Raises RejectedError (gate ``validation``) if it is not a readable model folder."""
    try:
        folder = ModelFolder.open(path)
    except ModelFolderError as exc:
        raise RejectedError(str(exc), gate="validation") from exc
    dtypes: dict[str, int] = {}
    for info in folder.tensors.values():
        dtypes[info.entry.dtype] = dtypes.get(info.entry.dtype, 0) + 1
    facts |= {"size": sum(t.nbytes for t in folder.tensors.values()),
              "parameters": sum(t.numel for t in folder.tensors.values()), "dtypes": dtypes}
    return Checkpoint(folder, facts, BackgroundDigest(path))
