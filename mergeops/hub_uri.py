"""``hf://org/repo@revision``: how the ledger, the policy and the model card name a Hub model.

A low-layer module (no imports from mergeops): the daemon, the ledger, publishing and the registry all parse
and build these strings through :class:`HubUri`, so the form stored in the ledger is written in one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "hf://"
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")  # a full commit id; branch names move, these do not


def is_hub(text: str) -> bool:
    """Whether ``text`` names a Hub model (``hf://...``) rather than a local folder."""
    return text.startswith(SCHEME)


def is_commit_sha(revision: str) -> bool:
    """Whether ``revision`` is a full 40-hex commit id."""
    return COMMIT_SHA.fullmatch(revision) is not None


@dataclass(frozen=True)
class HubUri:
    """A Hub model repository ``repo`` (``org/name``) at ``revision`` (None when the URI names none)."""

    repo: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> HubUri | None:
        """The URI ``text`` holds, or None for anything that is not ``hf://...`` (a local path)."""
        if not is_hub(text):
            return None
        # A repo id never contains "@"; a revision might, so split at the first one.
        repo, at, revision = text.removeprefix(SCHEME).partition("@")
        return cls(repo, revision if at else None)

    def __str__(self) -> str:
        return f"{SCHEME}{self.repo}" + (f"@{self.revision}" if self.revision is not None else "")

    @property
    def public_name(self) -> str:
        """``org/repo@revision``: the URI without its scheme."""
        return str(self).removeprefix(SCHEME)
