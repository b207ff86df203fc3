"""A Hugging Face Hub repository as a registry of checkpoints (SPEC §7).

Every commit of the watched revision is one checkpoint, identified as ``hf://org/repo@<commit sha>`` (never a
branch name, which moves). The daemon polls :meth:`HubRegistry.new_commits`, vets each commit with
:meth:`HubRegistry.check` from the file listing alone, and only then fetches it with :meth:`HubRegistry.download`,
which downloads into a temporary sibling folder and renames it into place, so a crash never leaves a half
downloaded checkpoint where intake would look.

Errors talking to the Hub (refused connections, timeouts, 5xx, rate limits) raise :class:`RegistryUnavailable`
with a ``retry_after`` from a per-registry exponential backoff, so the daemon can wait and try again instead of
crashing. A repository or revision that does not exist is a :class:`~mergeops.errors.UsageError`: the policy is
wrong and retrying will not help.

huggingface_hub reads ``HF_ENDPOINT`` once, when it is imported; the registry reads it when it is created, so a
changed environment (a test, a mirror configured late) is honoured.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, get_session, hf_hub_url, snapshot_download
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, tqdm

from mergeops import untrusted
from mergeops.durable import fsync_dir, fsync_file
from mergeops.errors import RejectedError, UntrustedFileError, UsageError
from mergeops.hub import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
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
from mergeops.hub_uri import HubUri, is_commit_sha
from mergeops.model.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from mergeops.model.folder import INDEX_FILE, PICKLE_SUFFIXES, SINGLE_FILE

__all__ = ["HubCommit", "HubRegistry", "RegistryUnavailable", "hub_token"]

log = logging.getLogger(__name__)

MAX_INDEX_BYTES = 64 << 20


@dataclass(frozen=True)
class HubCommit:
    """One commit of a watched Hub repository: one checkpoint."""

    repo: str
    sha: str
    title: str
    created: str  # ISO 8601, from the Hub

    @property
    def source(self) -> str:
        """How the ledger names this checkpoint: always the commit sha, never a branch name."""
        return str(HubUri(self.repo, self.sha))


class HubRegistry:
    """Poll ``revision`` of the Hub model repository ``repo`` and fetch its commits into ``download_dir``.

    ``token`` defaults to :func:`hub_token`; when neither is set, huggingface_hub's own login (if any) is used.
    ``allow_pickle`` mirrors the policy switch: without it, a commit whose only weights are pickles is refused.
    """

    def __init__(self, repo: str, revision: str, download_dir: Path, token: str | None = None, *,
                 allow_pickle: bool = False) -> None:
        check_repo_id(repo)
        if not revision:
            raise UsageError(f"The watch of Hub repository {repo} has an empty revision; give a branch such as 'main'.")
        self.repo = repo
        self.revision = revision
        self.download_dir = Path(download_dir)
        self.allow_pickle = allow_pickle
        self.endpoint = hub_endpoint()
        self._token = token if token is not None else hub_token()
        self._api = HfApi(endpoint=self.endpoint, token=self._token, library_name="mergeops")
        self._failures = 0

    def __repr__(self) -> str:  # no token in here, ever
        return f"HubRegistry({self.repo!r}, revision={self.revision!r}, endpoint={self.endpoint!r})"

    @property
    def retry_after(self) -> float:
        """The wait the next failure would ask for (5 s after a success, doubling up to 300 s)."""
        return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** self._failures)

    # -- the three steps the daemon takes ------------------------------------------------------------------

    def new_commits(self, known: Callable[[str], bool]) -> list[HubCommit]:
        """Commits of ``revision`` whose :attr:`HubCommit.source` is not ``known``, oldest first."""
        with self._talking(self.revision):
            # model_info makes one request without retries, so an unreachable Hub fails fast here;
            # list_repo_commits retries with backoff for ~25 s before giving up.
            self._api.model_info(self.repo, revision=self.revision, timeout=REQUEST_TIMEOUT)
            history = self._api.list_repo_commits(self.repo, revision=self.revision)
        commits = [HubCommit(self.repo, c.commit_id, c.title, c.created_at.isoformat()) for c in reversed(history)]
        new = [c for c in commits if not known(c.source)]
        if new:
            log.info("hub %s@%s: %d new commit(s) of %d", self.repo, self.revision, len(new), len(commits))
        return new

    def check(self, commit: HubCommit) -> None:
        """Refuse a commit from its file listing, before downloading it (RejectedError)."""
        self._own(commit)
        with self._talking(commit.sha):
            info = self._api.model_info(self.repo, revision=commit.sha, timeout=REQUEST_TIMEOUT)
        files = {s.rfilename for s in info.siblings or []}
        pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
        if ADAPTER_CONFIG in files:  # a LoRA adapter: its factors must be safetensors, whatever allow_pickle says
            if ADAPTER_WEIGHTS not in files:
                raise RejectedError(f"{commit.source} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS} (files: "
                                    f"{', '.join(sorted(files)[:5])}); push the adapter saved with safetensors "
                                    "(save_pretrained(safe_serialization=True)) in one commit.")
            return
        if SINGLE_FILE in files:
            return
        if INDEX_FILE in files:
            self._check_index(commit, files)
            return
        if pickles and self.allow_pickle:
            return
        if pickles:
            raise RejectedError(
                f"{commit.source} has only pickle weights ({', '.join(pickles[:3])}); push the weights as "
                f"safetensors (save_pretrained(safe_serialization=True)) or set allow_pickle = true in the policy.")
        raise RejectedError(
            f"{commit.source} has no {SINGLE_FILE} or {INDEX_FILE} "
            f"(files: {', '.join(sorted(files)[:5]) or 'none'}); push a complete checkpoint in one commit.")

    def download(self, commit: HubCommit) -> Path:
        """The commit as a local model folder, downloaded atomically (an existing one is returned as is)."""
        self._own(commit)
        final = self.download_dir / self.repo.replace("/", "--") / commit.sha
        if final.is_dir():
            return final
        partial = final.with_name(f".{commit.sha}.incomplete")
        if partial.exists():  # left by a crash or a failed download: never resume into it blind
            shutil.rmtree(partial)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._talking(commit.sha):
                self._api.model_info(self.repo, revision=commit.sha, timeout=REQUEST_TIMEOUT)  # fail fast
                snapshot_download(self.repo, revision=commit.sha, local_dir=partial, token=self._token,
                                  endpoint=self.endpoint, library_name="mergeops", tqdm_class=_Quiet)
            # huggingface_hub's bookkeeping (per-file etags, the tree listing) only serves a later
            # snapshot_download into the same folder; ours never changes again, so drop it.
            shutil.rmtree(partial / ".cache", ignore_errors=True)
            _fsync_tree(partial)
            try:
                partial.rename(final)
            except OSError:
                if not final.is_dir():
                    raise
                shutil.rmtree(partial)  # someone else finished the same commit first
            fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        log.info("hub %s: downloaded to %s", commit.source, final)
        return final

    # -- helpers ------------------------------------------------------------------------------------------

    def _own(self, commit: HubCommit) -> None:
        if commit.repo != self.repo:
            raise UsageError(f"{commit.source} does not belong to the registry of {self.repo}.")
        if not is_commit_sha(commit.sha):
            raise UsageError(f"{commit.source} does not name a full commit sha; take commits from new_commits().")

    def _check_index(self, commit: HubCommit, files: set[str]) -> None:
        """Every shard the index names is in the same commit (producers pushing shard by shard are caught)."""
        url = hf_hub_url(self.repo, INDEX_FILE, revision=commit.sha, endpoint=self.endpoint)
        headers = build_hf_headers(token=self._token, library_name="mergeops")
        with self._talking(commit.sha):
            response = get_session().get(url, headers=headers, timeout=REQUEST_TIMEOUT, follow_redirects=True)
            hf_raise_for_status(response)
        if len(response.content) > MAX_INDEX_BYTES:
            raise RejectedError(f"{INDEX_FILE} of {commit.source} is larger than {MAX_INDEX_BYTES >> 20} MB; "
                                "it cannot be a shard index, push a valid one.")
        try:
            weight_map = untrusted.parse_json(response.content, f"{INDEX_FILE} of {commit.source}")["weight_map"]
            shards = set(weight_map.values())
        except (UntrustedFileError, KeyError, TypeError, AttributeError):
            raise RejectedError(f"{INDEX_FILE} of {commit.source} is not a JSON object with a 'weight_map'; "
                                "push the index save_pretrained wrote.") from None
        missing = sorted(str(s) for s in shards - files)
        if missing:
            raise RejectedError(f"{commit.source}: {INDEX_FILE} names {len(missing)} shard(s) not in the commit "
                                f"({', '.join(missing[:3])}); push all shards and the index in one commit.")

    @contextlib.contextmanager
    def _talking(self, revision: str) -> Iterator[None]:
        """Translate huggingface_hub's errors into ours and keep the backoff state."""
        with translating(lambda failure: self._explain(failure, revision)):
            yield
        self._failures = 0

    def _explain(self, failure: HubFailure, revision: str) -> UsageError | RegistryUnavailable:
        where = f"{self.repo}@{revision} on {self.endpoint}"
        match failure.trouble:
            case HubTrouble.OFFLINE:
                return UsageError(f"HF_HUB_OFFLINE is set, so Hub repository {self.repo} cannot be polled; "
                                  "unset it for the daemon or watch a local folder.")
            case HubTrouble.GATED:
                return UsageError(f"Hub repository {self.repo} is gated; accept its terms on the Hub with the account "
                                  f"whose token the daemon uses ({TOKEN_HINT}).")
            case HubTrouble.NO_REPO:
                return UsageError(f"Hub repository {self.repo} was not found on {self.endpoint} (or it is private "
                                  f"and the token cannot read it); check 'hub' in the policy, or set {TOKEN_HINT}.")
            case HubTrouble.NO_REVISION if is_commit_sha(revision):
                return UsageError(f"Commit {self.repo}@{revision} was not found on {self.endpoint} (was the history "
                                  "rewritten?); it cannot be fetched, poll for new commits instead.")
            case HubTrouble.NO_REVISION:
                return UsageError(f"Revision {revision!r} of Hub repository {self.repo} was not found on "
                                  f"{self.endpoint}; check 'revision' in the policy.")
            case HubTrouble.DISABLED:
                return UsageError(f"Hub repository {self.repo} is disabled on {self.endpoint}; "
                                  "watch another repository.")
            case HubTrouble.BUSY:
                return self._unavailable(f"the Hub answered HTTP {failure.status} for {where}", failure.retry_after)
            case HubTrouble.DENIED:
                return UsageError(f"The Hub refused access to {where} (HTTP {failure.status}); give the daemon a "
                                  f"token that can read it ({TOKEN_HINT}).")
            case HubTrouble.HTTP:
                return UsageError(f"The Hub answered HTTP {failure.status} for {where}; check 'hub' and 'revision' "
                                  "in the policy.")
            case HubTrouble.UNREACHABLE:
                return self._unavailable(f"cannot reach {where} ({failure.detail})")

    def _unavailable(self, reason: str, hinted: float | None = None) -> RegistryUnavailable:
        wait = backoff(self.retry_after, hinted)
        self._failures += 1
        log.warning("hub %s: %s; retrying in %.0f s", self.repo, reason, wait)
        return RegistryUnavailable(f"Hub registry {self.repo} is unavailable: {reason}; "
                                   f"the daemon retries in {wait:.0f} s.", retry_after=wait)


class _Quiet(tqdm):
    """No progress bars: a daemon's stderr is the journal."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fsync_file(Path(dirpath) / name)
        fsync_dir(Path(dirpath))
