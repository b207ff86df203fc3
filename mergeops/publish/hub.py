"""Push a finished model folder to a Hugging Face Hub model repository as one commit.

Every regular file of the folder (weights, config, the README.md model card, provenance.json, model.sig) goes up
in a single ``HfApi.create_commit``; files the branch holds that the folder does not (say, the shards of a
previous, differently sharded version) are deleted in the same commit, so the commit is exactly the folder and
``model.sig`` verifies against a download of it. ``.gitattributes`` and the other ``.git*`` files the Hub keeps
are left alone, as are ``.git/`` and ``.cache/`` in the folder (local bookkeeping, never uploaded).

``HfApi.upload_folder`` is not used: with ``hf_xet`` installed it may split an upload into several commits.
The commit names the branch head it was prepared against (``parent_commit``), so a commit that landed in
between makes the Hub refuse ours instead of silently mixing the two. Files that did not change are left out
of the commit by huggingface_hub, and a folder identical to the branch head makes no commit at all (its sha is
returned), so publishing again after a lost answer is safe.

The repository is never created here: publishing to a repository that does not exist, or to a branch that does
not exist, is a :class:`~mergeops.errors.UsageError`, as are refused credentials. A Hub that cannot be reached or
answers 5xx (or 429, or a concurrent commit) is :class:`~mergeops.registry.hub.RegistryUnavailable`. The token
is never logged nor put in a message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import HFValidationError, OfflineModeIsEnabled, validate_repo_id

from mergeops.errors import ModelFolderError, UsageError
from mergeops.registry.hub import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    CREDENTIAL_NAME,
    REQUEST_TIMEOUT,
    RegistryUnavailable,
    hub_token,
    retry_after_header,
)

try:  # huggingface_hub 2.x talks through httpx2, 1.x through httpx
    import httpx2 as _http
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    import httpx as _http  # type: ignore[no-redef]

__all__ = ["upload_to_hub"]

log = logging.getLogger(__name__)

_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_RETRYABLE_STATUS = frozenset({408, 425, 429})
_CONFLICT_STATUS = frozenset({409, 412})  # the branch moved since we looked (parent_commit no longer its head)
_LOCAL_ONLY_DIRS = (".git", ".cache")  # never uploaded: git internals, huggingface_hub download metadata


def upload_to_hub(folder: Path, repo: str, *, revision: str = "main", message: str,
                  token: str | None = None) -> str:
    """Upload every file of ``folder`` to branch ``revision`` of Hub model repo ``repo`` as one commit.

    Returns the sha of the commit that holds the folder. ``token`` defaults to :func:`~mergeops.registry.hub.
    hub_token` (``HF_TOKEN`` or the ``hf_token`` systemd credential), else huggingface_hub's own login.
    """
    folder = Path(folder)
    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise UsageError(f"Hub repository {repo!r} is not a valid repo id; write it as 'org/name'.") from None
    if not revision or _COMMIT_SHA.fullmatch(revision):
        raise UsageError(f"Cannot upload to revision {revision!r} of Hub repository {repo}; give a branch such "
                         "as 'main'.")
    if not message.strip():
        raise UsageError(f"Uploading {folder} to Hub repository {repo} needs a commit message.")
    files = _folder_files(folder)
    endpoint = (os.environ.get("HF_ENDPOINT", "").rstrip("/") or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token if token is not None else hub_token(), library_name="mergeops")
    with _translating(repo, revision, endpoint, folder):
        # model_info makes one request without retries: an unreachable Hub, a missing repo or branch, or a
        # token that cannot read fail here, before anything is hashed or sent (preupload retries for ~25 s).
        head = api.model_info(repo, revision=revision, timeout=REQUEST_TIMEOUT)
        remote = {sibling.rfilename for sibling in head.siblings or []}
        stale = sorted(name for name in remote - files.keys() if not name.split("/", 1)[0].startswith(".git"))
        operations: list[CommitOperationAdd | CommitOperationDelete] = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in sorted(files.items())]
        operations += [CommitOperationDelete(path_in_repo=name) for name in stale]
        commit = api.create_commit(repo, operations, commit_message=message, revision=revision,
                                   parent_commit=head.sha if head.sha and _COMMIT_SHA.fullmatch(head.sha) else None)
    sha = str(commit.oid)
    if sha == head.sha:
        log.info("hub %s@%s: %s is already there as commit %s; nothing committed", repo, revision, folder, sha)
    else:
        log.info("hub %s@%s: uploaded %d file(s) of %s (%d stale removed) as commit %s", repo, revision,
                 len(files), folder, len(stale), sha)
    return sha


def _folder_files(folder: Path) -> dict[str, Path]:
    """``{path in repo: local path}`` of every regular file; symlinks and special files are refused."""
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist or is not a directory; nothing was uploaded.")
    root = folder.resolve()  # the folder itself may be a link (output/latest)
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not (d in _LOCAL_ONLY_DIRS and (d == ".git" or here == root)))
        for name in (*dirnames, *filenames):
            path = here / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise ModelFolderError(f"{path} is a symlink; replace it with a copy of its target (only regular "
                                       "files are uploaded, so nothing outside the folder can leak). Nothing was "
                                       "uploaded.")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise ModelFolderError(f"{path} is not a regular file; remove it from the model folder. Nothing was "
                                       "uploaded.")
            if stat.S_ISREG(mode):
                files[path.relative_to(root).as_posix()] = path
    if not files:
        raise ModelFolderError(f"model folder {folder} has no files; nothing was uploaded.")
    return files


@contextlib.contextmanager
def _translating(repo: str, revision: str, endpoint: str, folder: Path) -> Iterator[None]:
    """huggingface_hub's errors as ours: UsageError for what the user must fix, RegistryUnavailable to retry."""
    where = f"{repo}@{revision} on {endpoint}"
    token_hint = f"HF_TOKEN or the {CREDENTIAL_NAME} credential"
    try:
        yield
    except OfflineModeIsEnabled:
        raise UsageError(f"HF_HUB_OFFLINE is set, so {folder} cannot be uploaded to Hub repository {repo}; "
                         "unset it to publish to the Hub.") from None
    except GatedRepoError:
        raise UsageError(f"Hub repository {repo} is gated and the token has no access to it; use a token with write "
                         f"access to {repo} ({token_hint}).") from None
    except RepositoryNotFoundError:
        raise UsageError(f"Hub repository {repo} was not found on {endpoint}, or the token cannot see it; mergeops "
                         f"does not create repositories: create it (`hf repos create {repo}`) and give a token with "
                         f"write access to it ({token_hint}).") from None
    except RevisionNotFoundError:
        raise UsageError(f"Branch {revision!r} of Hub repository {repo} does not exist on {endpoint}; create it "
                         f"(`hf repos branch create {repo} {revision}`) or publish to 'main'.") from None
    except DisabledRepoError:
        raise UsageError(f"Hub repository {repo} is disabled on {endpoint}; publish to another repository.") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else 0
        if status >= 500 or status in _RETRYABLE_STATUS:
            wait = max(BACKOFF_FIRST, min(retry_after_header(error.response) or 0.0, BACKOFF_MAX))
            raise _unavailable(f"the Hub answered HTTP {status} while uploading {folder} to {where}", wait) from None
        if status in _CONFLICT_STATUS:
            raise _unavailable(f"another commit landed on {where} while {folder} was being uploaded, so the Hub "
                               "refused ours", BACKOFF_FIRST) from None
        if status in (401, 403):
            raise UsageError(f"The Hub refused the upload to {where} (HTTP {status}); give a token with write access "
                             f"to {repo} ({token_hint}).") from None
        detail = f": {error.server_message}" if getattr(error, "server_message", None) else ""
        raise UsageError(f"The Hub refused the upload of {folder} to {where} (HTTP {status}{detail}); nothing was "
                         "committed.") from None
    except _http.TransportError as error:
        raise _unavailable(f"cannot reach {endpoint} to upload {folder} to {repo} ({type(error).__name__}: {error})",
                           BACKOFF_FIRST) from None
    except json.JSONDecodeError:
        raise _unavailable(f"the Hub gave an answer that is not JSON while uploading {folder} to {where}",
                           BACKOFF_FIRST) from None
    except ValueError as error:
        if "README.md" not in str(error):
            raise
        raise UsageError(f"The Hub refused the model card {folder / 'README.md'}: {error}; fix its metadata "
                         "block. Nothing was uploaded.") from None


def _unavailable(reason: str, wait: float) -> RegistryUnavailable:
    log.warning("hub upload: %s; retry in %.0f s", reason, wait)
    return RegistryUnavailable(f"Cannot publish to the Hub now: {reason}; publishing again in {wait:.0f} s is safe "
                               "(files already there are not committed twice).", retry_after=wait)
