"""What talking to the Hugging Face Hub needs on both sides, the registry that reads and the publisher that writes.

Here live the token lookup, the endpoint, the retry timings, :class:`RegistryUnavailable`, and
:func:`translating`, the one place that knows which huggingface_hub / HTTP errors mean what: the caller gets a
:class:`HubFailure` (what went wrong, the HTTP status, the server's ``Retry-After``) and words the message for
what it was doing. A low-layer module: it imports nothing from the mergeops stages.
"""

from __future__ import annotations

import contextlib
import email.utils
import enum
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import HFValidationError, OfflineModeIsEnabled, validate_repo_id

from mergeops import untrusted
from mergeops.errors import MergeopsError, UntrustedFileError, UsageError

try:  # huggingface_hub 2.x talks through httpx2, 1.x through httpx
    import httpx2 as _http
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    import httpx as _http  # type: ignore[no-redef]

__all__ = ["BACKOFF_FIRST", "BACKOFF_MAX", "CREDENTIAL_NAME", "REQUEST_TIMEOUT", "TOKEN_HINT", "HubFailure",
           "HubTrouble", "RegistryUnavailable", "backoff", "check_repo_id", "hub_endpoint", "hub_token",
           "retry_after_header", "translating"]

CREDENTIAL_NAME = "hf_token"  # LoadCredential=hf_token:/path/to/token in the systemd unit
TOKEN_HINT = f"HF_TOKEN or the {CREDENTIAL_NAME} credential"

BACKOFF_FIRST = 5.0
BACKOFF_MAX = 300.0
REQUEST_TIMEOUT = 30.0
_RETRYABLE_STATUS = frozenset({408, 425, 429})


class RegistryUnavailable(MergeopsError):
    """The registry cannot be reached right now; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def hub_token() -> str | None:
    """The Hub token: ``HF_TOKEN``, else the systemd credential ``hf_token``, else None. Never logged."""
    token = os.environ.get("HF_TOKEN", "").strip()
    if token:
        return token
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if not credentials:
        return None
    path = Path(credentials) / CREDENTIAL_NAME
    if not os.path.lexists(path):
        return None
    try:
        token = untrusted.read_text(path, max_bytes=64 << 10).strip()
    except UntrustedFileError as error:
        raise UsageError(f"Cannot read the Hub token credential {path}: it {error.reason}; "
                         f"check LoadCredential={CREDENTIAL_NAME}:... in the service unit.") from None
    return token or None


def hub_endpoint() -> str:
    """The Hub's URL from ``HF_ENDPOINT`` now (huggingface_hub reads it only once, when it is imported)."""
    return (os.environ.get("HF_ENDPOINT", "").rstrip("/") or constants.ENDPOINT).rstrip("/")


def check_repo_id(repo: str) -> None:
    """UsageError unless ``repo`` is a valid Hub repo id (``org/name``)."""
    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise UsageError(f"Hub repository {repo!r} is not a valid repo id; write it as 'org/name'.") from None


def backoff(floor: float, hinted: float | None) -> float:
    """The wait before trying again: at least ``floor``, longer if the server asked (capped at BACKOFF_MAX)."""
    return max(floor, min(hinted or 0.0, BACKOFF_MAX))


def retry_after_header(response: object) -> float | None:
    """Seconds an HTTP ``Retry-After`` header asks to wait (a number or a date), if the response has one."""
    value = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class HubTrouble(enum.Enum):
    """What a failed Hub request means for the user."""

    OFFLINE = "HF_HUB_OFFLINE is set"
    GATED = "the repository is gated"
    NO_REPO = "the repository does not exist, or the token cannot see it"
    NO_REVISION = "the revision does not exist"
    DISABLED = "the repository is disabled"
    BUSY = "the Hub answered 5xx or asked to slow down: try again"
    DENIED = "the Hub refused the token (HTTP 401 or 403)"
    HTTP = "the Hub refused the request with another HTTP status"
    UNREACHABLE = "the Hub cannot be reached: try again"


@dataclass(frozen=True)
class HubFailure:
    """One failed Hub request: what it means, its HTTP status (0 without one) and the server's words."""

    trouble: HubTrouble
    status: int = 0
    retry_after: float | None = None  # what the server's Retry-After asked for, if anything
    detail: str = ""  # the server's message (HTTP) or the transport error ("ConnectError: ...")


@contextlib.contextmanager
def translating(explain: Callable[[HubFailure], MergeopsError]) -> Iterator[None]:
    """Raise ``explain(problem)`` instead of any huggingface_hub or transport error from the block."""
    try:
        yield
    except OfflineModeIsEnabled:
        raise explain(HubFailure(HubTrouble.OFFLINE)) from None
    except GatedRepoError:  # before RepositoryNotFoundError, its base class
        raise explain(HubFailure(HubTrouble.GATED)) from None
    except RepositoryNotFoundError:
        raise explain(HubFailure(HubTrouble.NO_REPO)) from None
    except RevisionNotFoundError:
        raise explain(HubFailure(HubTrouble.NO_REVISION)) from None
    except DisabledRepoError:
        raise explain(HubFailure(HubTrouble.DISABLED)) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else 0
        if status >= 500 or status in _RETRYABLE_STATUS:
            trouble = HubTrouble.BUSY
        else:
            trouble = HubTrouble.DENIED if status in (401, 403) else HubTrouble.HTTP
        raise explain(HubFailure(trouble, status, retry_after_header(error.response),
                              getattr(error, "server_message", None) or "")) from None
    except (_http.TransportError, LocalEntryNotFoundError) as error:
        # LocalEntryNotFoundError: snapshot_download could not reach the Hub and had nothing cached.
        raise explain(HubFailure(HubTrouble.UNREACHABLE, detail=f"{type(error).__name__}: {error}")) from None
