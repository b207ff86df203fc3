"""A problem found in a model folder: one sentence, plus where it is."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a model folder.

    ``code`` is stable for programs (``truncated_file``, ``non_finite`` ...); ``message`` is the
    sentence for people and names the file or tensor and what to do.
    """

    code: str
    message: str
    file: str | None = None
    tensor: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return asdict(self)
