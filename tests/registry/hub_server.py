"""A loopback Hugging Face Hub for tests: the few endpoints huggingface_hub calls to poll, download and upload.

Endpoints (as huggingface_hub 2.x calls them; ``{rev}`` is a branch or a commit sha, URL-quoted):

- ``GET  /api/models/{repo}/commits/{rev}``       HfApi.list_repo_commits (newest first, ``Link`` pagination)
- ``GET  /api/models/{repo}/revision/{rev}``      HfApi.model_info (``siblings``; sizes and lfs with ``blobs=True``)
- ``GET  /api/models/{repo}/tree/{rev}[/{path}]`` HfApi.list_repo_tree, which snapshot_download lists files with
- ``HEAD /{repo}/resolve/{rev}/{filename}``        file metadata: ``X-Repo-Commit``, ``ETag`` (+ ``X-Linked-Etag``,
  ``X-Linked-Size`` for LFS files), ``Content-Length``; no ``X-Xet-Hash``, so downloads are plain HTTP
- ``GET  /{repo}/resolve/{rev}/{filename}``        the bytes (``Range`` honoured, for resumed downloads)

Uploads, as ``HfApi.create_commit`` makes them (``{branch}`` must be ``main``):

- ``POST /api/validate-yaml``                      the README.md metadata check (always valid here)
- ``POST /api/models/{repo}/preupload/{branch}``  upload modes: every file is ``regular`` (with the ``oid`` of the
  file already at that path, so unchanged files are left out of the commit), so no LFS or xet transfer happens
- ``POST /api/models/{repo}/commit/{branch}``     the commit, NDJSON: a ``header`` line (``summary``, optional
  ``parentCommit``: 412 if the branch moved), then ``file`` lines (base64 content), ``deletedFile`` and
  ``deletedFolder`` lines. It becomes a new commit whose tree is the parent's with those changes.

Errors carry the ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) that
huggingface_hub turns into its typed exceptions. Each repo has one branch, ``main``, with a linear history;
each commit is a full tree (``{filename: bytes}``), as if a producer ran ``upload_folder`` with
``delete_patterns="*"``. Every request is recorded with its headers (and body, for POSTs).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_EPOCH = datetime(2025, 1, 1, tzinfo=UTC)


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    title: str
    date: str
    files: dict[str, bytes]


@dataclass
class Request:
    method: str
    path: str  # unquoted path, without the query
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes = b""


@dataclass
class _Repo:
    commits: list[Commit] = field(default_factory=list)  # oldest first

    def history(self, revision: str) -> list[Commit] | None:
        """Commits up to ``revision`` (oldest first), or None if it names nothing."""
        if revision == "main":
            return list(self.commits)
        for i, commit in enumerate(self.commits):
            if commit.sha == revision:
                return self.commits[: i + 1]
        return None


class HubServer:
    """An in-memory Hub on 127.0.0.1 (ephemeral port). ``add_commit`` simulates a producer pushing."""

    def __init__(self, repo: str = "acme/finetunes", page_size: int = 50) -> None:
        self.default_repo = repo
        self.page_size = page_size
        self.repos: dict[str, _Repo] = {repo: _Repo()}
        self.requests: list[Request] = []
        self.fail_status: int | None = None  # answer every request with this status (e.g. 503)
        self.fail_when: Callable[[Request], int | None] | None = None  # a status for some requests, None for others
        self.write_token: str | None = None  # if set, uploads need it as Bearer (none: 401, another: 403)
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- producer side ----------------------------------------------------------------------------------

    def add_commit(self, files: dict[str, bytes], *, repo: str | None = None, title: str | None = None) -> str:
        """Push a commit whose tree is exactly ``files``; returns its sha."""
        with self._lock:
            return self._append(self.repos.setdefault(repo or self.default_repo, _Repo()), files, title)

    def _append(self, repo: _Repo, files: dict[str, bytes], title: str | None) -> str:
        """Add a commit on top of ``repo``'s history (the lock is held)."""
        history = repo.commits
        parent = history[-1].sha if history else ""
        number = len(history) + 1
        title = title or f"checkpoint {number}"
        tree = "".join(f"{name}\0{git_blob_sha(data)}\n" for name, data in sorted(files.items()))
        sha = hashlib.sha1(f"tree {tree}\nparent {parent}\n\n{title}".encode()).hexdigest()
        date = (_EPOCH + timedelta(minutes=number)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        history.append(Commit(sha, title, date, dict(files)))
        return sha

    def _commit_upload(self, name: str, lines: list[dict]) -> str:
        """Apply a ``/commit`` NDJSON payload to ``main`` and return the new commit's sha, or raise _Refused."""
        header = next((line.get("value") or {} for line in lines if line.get("key") == "header"), None)
        if header is None or not header.get("summary"):
            raise _Refused(400, "", "The commit has no header with a summary")
        with self._lock:
            repo = self.repos[name]
            head = repo.commits[-1] if repo.commits else None
            parent = header.get("parentCommit")
            if parent and (head is None or not head.sha.startswith(parent)):
                raise _Refused(412, "", "A commit has happened since. Please refresh and try again.")
            files = dict(head.files) if head else {}
            for line in lines:
                key, value = line.get("key"), line.get("value") or {}
                path = value.get("path", "")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise _Refused(400, "", f"Unsupported encoding {value.get('encoding')!r} for {path}")
                    try:
                        files[path] = base64.b64decode(value.get("content", ""), validate=True)
                    except binascii.Error:
                        raise _Refused(400, "", f"Invalid base64 content for {path}") from None
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise _Refused(404, "EntryNotFound", f"A file with this name doesn't exist: {path}")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for gone in [f for f in files if f.startswith(prefix)]:
                        del files[gone]
                elif key != "header":  # lfsFile: this Hub never asks for LFS, so the object cannot be here
                    raise _Refused(400, "", f"Unsupported commit operation {key!r} for {path}")
            return self._append(repo, files, header["summary"])

    # -- observation ------------------------------------------------------------------------------------

    def seen(self, method: str | None = None, contains: str = "") -> list[Request]:
        with self._lock:
            return [r for r in self.requests if (method is None or r.method == method) and contains in r.path]

    def resolve_requests(self, sha: str | None = None) -> list[Request]:
        return [r for r in self.seen(contains="/resolve/") if sha is None or f"/resolve/{sha}/" in r.path]

    # -- lifecycle --------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HubServer:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                         name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering: the port refuses connections (HTTP/1.0, so no connection outlives a response)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the Hub's answers ------------------------------------------------------------------------------

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _snapshot(self) -> dict[str, _Repo]:
        with self._lock:
            return {name: _Repo(list(repo.commits)) for name, repo in self.repos.items()}

    def _split_repo(self, rest: str, marker: str) -> tuple[str, str]:
        """``org/name/<marker>/tail`` -> (repo, tail), matching known repos first (ids may have one segment)."""
        for name in sorted(self.repos, key=len, reverse=True):
            if rest.startswith(f"{name}/{marker}/"):
                return name, rest[len(name) + len(marker) + 2:]
        head, sep, tail = rest.partition(f"/{marker}/")
        return head, tail if sep else ""


class _Refused(Exception):
    """A commit the Hub refuses: the HTTP status, its X-Error-Code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _entry(name: str, data: bytes) -> dict:
    entry: dict = {"type": "file", "oid": git_blob_sha(data), "size": len(data), "path": name}
    if name.endswith(LFS_SUFFIXES):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_POST(self) -> None:
        split = urlsplit(self.path)
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        request = Request("POST", unquote(split.path), parse_qs(split.query),
                          {k.lower(): v for k, v in self.headers.items()}, data)
        self.hub._record(request)
        failure = self._failure(request)
        if failure is not None:
            return self._error(failure, "", "Simulated outage", True)
        raw = split.path
        if raw == "/api/validate-yaml":
            return self._json({"errors": [], "warnings": []}, True)
        if not raw.startswith("/api/models/"):
            return self._error(404, "", "Not found", True)
        rest = raw[len("/api/models/"):]
        for kind in ("preupload", "commit"):
            repo, revision = self.hub._split_repo(rest, kind)
            if revision:
                break
        else:
            return self._error(404, "", "Not found", True)
        repo = unquote(repo)
        if repo not in self.hub.repos:
            return self._error(404, "RepoNotFound", "Repository not found", True)
        if self.hub.write_token is not None:
            auth = self.headers.get("Authorization")
            if not auth:
                return self._error(401, "", "You must be authenticated to write to this repo", True)
            if auth != f"Bearer {self.hub.write_token}":
                return self._error(403, "", "You don't have the rights to create a commit in this repo", True)
        if unquote(revision) != "main":
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(revision)}", True)
        try:
            payload = json.loads(data) if kind == "preupload" else [json.loads(x) for x in data.splitlines() if x]
        except ValueError:
            return self._error(400, "", "Malformed JSON body", True)
        if kind == "preupload":
            return self._preupload(repo, payload)
        try:
            sha = self.hub._commit_upload(repo, payload)
        except _Refused as refused:
            return self._error(refused.status, refused.code, str(refused), True)
        self._json({"success": True, "commitOid": sha, "commitUrl": f"{self.hub.url}/{repo}/commit/{sha}",
                    "hookOutput": "", "pullRequestUrl": None}, True)

    def _failure(self, request: Request) -> int | None:
        if self.hub.fail_status is not None:
            return self.hub.fail_status
        return self.hub.fail_when(request) if self.hub.fail_when is not None else None

    # -- dispatch ---------------------------------------------------------------------------------------

    def _serve(self, body: bool) -> None:
        split = urlsplit(self.path)
        path = unquote(split.path)
        query = parse_qs(split.query)
        request = Request(self.command, path, query, {k.lower(): v for k, v in self.headers.items()})
        self.hub._record(request)
        failure = self._failure(request)
        if failure is not None:
            return self._error(failure, "", "Simulated outage", body)
        repos = self.hub._snapshot()
        raw = split.path
        if raw.startswith("/api/models/"):
            rest = raw[len("/api/models/"):]
            for kind in ("commits", "revision", "tree"):
                repo, tail = self.hub._split_repo(rest, kind)
                if tail:
                    break
            else:
                return self._error(404, "", "Not found", body)
            repo = unquote(repo)
            if repo not in repos:
                return self._error(404, "RepoNotFound", "Repository not found", body)
            revision, _, subpath = tail.partition("/")
            history = repos[repo].history(unquote(revision))
            if not history:
                return self._error(404, "RevisionNotFound", "Invalid rev id", body)
            if kind == "commits":
                return self._commits(repo, history, query, raw, body)
            if kind == "revision":
                return self._model_info(repo, history[-1], query, body)
            return self._tree(history[-1], unquote(subpath), query, body)
        repo, tail = self.hub._split_repo(raw.lstrip("/"), "resolve")
        if not tail:
            return self._error(404, "", "Not found", body)
        repo = unquote(repo)
        if repo not in repos:
            return self._error(404, "RepoNotFound", "Repository not found", body)
        revision, _, filename = tail.partition("/")
        history = repos[repo].history(unquote(revision))
        if not history:
            return self._error(404, "RevisionNotFound", "Invalid rev id", body)
        return self._resolve(history[-1], unquote(filename), body)

    # -- endpoints --------------------------------------------------------------------------------------

    def _commits(self, repo: str, history: list[Commit], query: dict, raw_path: str, body: bool) -> None:
        newest_first = list(reversed(history))
        page = int(query.get("p", ["0"])[0])
        size = self.hub.page_size
        items = [{"id": c.sha, "authors": [{"user": "producer", "avatar": ""}], "date": c.date, "title": c.title,
                  "message": ""} for c in newest_first[page * size:(page + 1) * size]]
        headers = {}
        if (page + 1) * size < len(newest_first):
            headers["Link"] = f'<http://{self.headers["Host"]}{raw_path}?p={page + 1}>; rel="next"'
        self._json(items, body, headers)

    def _model_info(self, repo: str, commit: Commit, query: dict, body: bool) -> None:
        blobs = query.get("blobs", ["False"])[0].lower() == "true"
        siblings = []
        for name, data in sorted(commit.files.items()):
            sibling: dict = {"rfilename": name}
            if blobs:
                entry = _entry(name, data)
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if "lfs" in entry:
                    sibling["lfs"] = {"sha256": entry["lfs"]["oid"], "size": entry["size"], "pointerSize": 134}
            siblings.append(sibling)
        self._json({"_id": hashlib.sha1(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo,
                    "author": repo.partition("/")[0], "sha": commit.sha, "lastModified": commit.date,
                    "private": False, "disabled": False, "gated": False, "tags": [], "downloads": 0, "likes": 0,
                    "siblings": siblings}, body)

    def _tree(self, commit: Commit, subpath: str, query: dict, body: bool) -> None:
        recursive = query.get("recursive", ["False"])[0].lower() == "true"
        prefix = f"{subpath.strip('/')}/" if subpath.strip("/") else ""
        files, folders = [], set()
        for name, data in sorted(commit.files.items()):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix):].split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                files.append(_entry(name, data))
        if prefix and not files and not folders:
            return self._error(404, "EntryNotFound", f"{subpath} does not exist", body)
        entries = [{"type": "directory", "oid": git_blob_sha(f.encode()), "size": 0, "path": f}
                   for f in sorted(folders)] + files
        self._json(entries, body)

    def _preupload(self, repo: str, payload: dict) -> None:
        """Every file ``regular``: its content then goes inline (base64) in the commit, no LFS or xet."""
        history = self.hub._snapshot()[repo].commits
        current = history[-1].files if history else {}
        answer = []
        for file in payload.get("files", []):
            entry = {"path": file["path"], "uploadMode": "regular", "shouldIgnore": False}
            if file["path"] in current:
                entry["oid"] = git_blob_sha(current[file["path"]])
            answer.append(entry)
        self._json({"files": answer, "commitOid": history[-1].sha if history else None}, True)

    def _resolve(self, commit: Commit, filename: str, body: bool) -> None:
        data = commit.files.get(filename)
        if data is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist", body, commit.sha)
        entry = _entry(filename, data)
        etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
        start = 0
        status = 200
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream",
                   "Content-Disposition": f'inline; filename="{quote(filename.rsplit("/", 1)[-1])}"'}
        if "lfs" in entry:
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(data))
        spec = self.headers.get("Range", "")
        if spec.startswith("bytes=") and spec[6:].split("-")[0].isdigit():
            start = min(int(spec[6:].split("-")[0]), len(data))
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._send(status, data[start:], body, headers)

    # -- plumbing ---------------------------------------------------------------------------------------

    def _json(self, payload: object, body: bool, headers: dict[str, str] | None = None) -> None:
        self._send(200, json.dumps(payload).encode(), body, {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str, body: bool, commit: str | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(status, json.dumps({"error": message}).encode(), body, headers)

    def _send(self, status: int, data: bytes, body: bool, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


def isolate_hub_client(monkeypatch: pytest.MonkeyPatch, endpoint: str, home: Path) -> None:
    """Point huggingface_hub at ``endpoint`` with a private HF_HOME, no token, online, no telemetry.

    The environment is set for subprocesses and for HubRegistry (which reads HF_ENDPOINT when created);
    huggingface_hub read the same variables into ``constants`` when it was imported, so those are set too.
    """
    from huggingface_hub import constants

    env = {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(home),
           "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "CREDENTIALS_DIRECTORY", "HF_HUB_ETAG_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))


@pytest.fixture(name="hub_server")
def hub_server_fixture(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    """``hub_server``: a running loopback Hub, huggingface_hub pointed at it and isolated from the user's setup.

    Import it into a test module (``from tests.registry.hub_server import hub_server_fixture  # noqa: F401``).
    """
    server = HubServer().start()
    isolate_hub_client(monkeypatch, server.url, tmp_path / "hf-home")
    try:
        yield server
    finally:
        server.stop()


__all__ = ["Commit", "HubServer", "Request", "git_blob_sha", "hub_server_fixture", "isolate_hub_client"]
