"""Errors a user can act on. Each carries the process exit code of SPEC §3.

The message is one sentence naming the file, tensor or key and what to do; the CLI prints it to
stderr and exits with ``exit_code`` instead of showing a traceback.
"""

from __future__ import annotations


class MergeopsError(Exception):
    """Base class: a problem the user can fix. Exit code 1 (a check found problems)."""

    exit_code = 1


class UsageError(MergeopsError):
    """Bad arguments, a bad policy file, or a key or setup the user must fix first. Exit code 2."""

    exit_code = 2


class PolicyError(UsageError):
    """The policy file is missing, malformed, or names something that does not exist."""


class ModelFolderError(MergeopsError):
    """A model folder cannot be read: missing, malformed, or refused (pickle, escaping paths)."""


class RejectedError(MergeopsError):
    """A checkpoint was rejected by validation or a gate. Exit code 3."""

    exit_code = 3

    def __init__(self, message: str, gate: str = "validation") -> None:
        super().__init__(message)
        self.gate = gate
