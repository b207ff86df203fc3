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
answers 5xx (or 429, or a concurrent commit) is :class:`~mergeops.hub.RegistryUnavailable`. The token
is never logged nor put in a message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

from mergeops.errors import ModelFolderError, UsageError
from mergeops.hub import (
    BACKOFF_FIRST,
    REQUEST_TIMEOUT,
    TOKEN_HINT,
    HubFailure,
    HubTrouble,
    RegistryUnavailable,
    backoff,
    check_repo_id,
    hub_endpoint,
    hub_token,
    translating,
)
from mergeops.hub_uri import is_commit_sha

__all__ = ["upload_to_hub"]

log = logging.getLogger(__name__)

_CONFLICT_STATUS = frozenset({409, 412})  # the branch moved since we looked (parent_commit no longer its head)
_LOCAL_ONLY_DIRS = (".git", ".cache")  # never uploaded: git internals, huggingface_hub download metadata


def upload_to_hub(folder: Path, repo: str, *, revision: str = "main", message: str,
                  token: str | None = None) -> str:
    """Upload every file of ``folder`` to branch ``revision`` of Hub model repo ``repo`` as one commit.

    Returns the sha of the commit that holds the folder. ``token`` defaults to :func:`~mergeops.hub.hub_token`
    (``HF_TOKEN`` or the ``hf_token`` systemd credential), else huggingface_hub's own login.
    """
    folder = Path(folder)
    check_repo_id(repo)
    if not revision or is_commit_sha(revision):
        raise UsageError(f"Cannot upload to revision {revision!r} of Hub repository {repo}; give a branch such "
                         "as 'main'.")
    if not message.strip():
        raise UsageError(f"Uploading {folder} to Hub repository {repo} needs a commit message.")
    files = _folder_files(folder)
    endpoint = hub_endpoint()
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
                                   parent_commit=head.sha if head.sha and is_commit_sha(head.sha) else None)
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
    try:
        with translating(lambda failure: _explain(failure, repo, revision, endpoint, folder)):
            yield
    except json.JSONDecodeError:
        where = f"{repo}@{revision} on {endpoint}"
        raise _unavailable(f"the Hub gave an answer that is not JSON while uploading {folder} to {where}",
                           BACKOFF_FIRST) from None
    except ValueError as error:
        if "README.md" not in str(error):
            raise
        raise UsageError(f"The Hub refused the model card {folder / 'README.md'}: {error}; fix its metadata "
                         "block. Nothing was uploaded.") from None


def _explain(failure: HubFailure, repo: str, revision: str, endpoint: str,
             folder: Path) -> UsageError | RegistryUnavailable:
    where = f"{repo}@{revision} on {endpoint}"
    match failure.trouble:
        case HubTrouble.OFFLINE:
            return UsageError(f"HF_HUB_OFFLINE is set, so {folder} cannot be uploaded to Hub repository {repo}; "
                              "unset it to publish to the Hub.")
        case HubTrouble.GATED:
            return UsageError(f"Hub repository {repo} is gated and the token has no access to it; use a token with "
                              f"write access to {repo} ({TOKEN_HINT}).")
        case HubTrouble.NO_REPO:
            return UsageError(f"Hub repository {repo} was not found on {endpoint}, or the token cannot see it; "
                              f"mergeops does not create repositories: create it (`hf repos create {repo}`) and give "
                              f"a token with write access to it ({TOKEN_HINT}).")
        case HubTrouble.NO_REVISION:
            return UsageError(f"Branch {revision!r} of Hub repository {repo} does not exist on {endpoint}; create it "
                              f"(`hf repos branch create {repo} {revision}`) or publish to 'main'.")
        case HubTrouble.DISABLED:
            return UsageError(f"Hub repository {repo} is disabled on {endpoint}; publish to another repository.")
        case HubTrouble.BUSY:
            return _unavailable(f"the Hub answered HTTP {failure.status} while uploading {folder} to {where}",
                                backoff(BACKOFF_FIRST, failure.retry_after))
        case HubTrouble.HTTP if failure.status in _CONFLICT_STATUS:
            return _unavailable(f"another commit landed on {where} while {folder} was being uploaded, so the Hub "
                                "refused ours", BACKOFF_FIRST)
        case HubTrouble.DENIED:
            return UsageError(f"The Hub refused the upload to {where} (HTTP {failure.status}); give a token with "
                              f"write access to {repo} ({TOKEN_HINT}).")
        case HubTrouble.HTTP:
            detail = f": {failure.detail}" if failure.detail else ""
            return UsageError(f"The Hub refused the upload of {folder} to {where} (HTTP {failure.status}{detail}); "
                              "nothing was committed.")
        case HubTrouble.UNREACHABLE:
            return _unavailable(f"cannot reach {endpoint} to upload {folder} to {repo} ({failure.detail})",
                                BACKOFF_FIRST)


def _unavailable(reason: str, wait: float) -> RegistryUnavailable:
    log.warning("hub upload: %s; retry in %.0f s", reason, wait)
    return RegistryUnavailable(f"Cannot publish to the Hub now: {reason}; publishing again in {wait:.0f} s is safe "
                               "(files already there are not committed twice).", retry_after=wait)
