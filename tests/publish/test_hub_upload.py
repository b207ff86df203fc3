"""Uploading a published model folder to the Hub, through the real huggingface_hub client against a loopback Hub."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest

from mergeops import keys
from mergeops.errors import ModelFolderError, UsageError
from mergeops.model import folder_digest
from mergeops.model.signing import sign_model_folder, verify_model_folder
from mergeops.publish.hub import upload_to_hub
from mergeops.registry.hub import HubRegistry, RegistryUnavailable
from tests.conftest import random_tensors, write_model
from tests.registry.hub_server import HubServer, Request, hub_server_fixture  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(30)

REPO = "acme/merged"
TOKEN = "hf_write_0123456789abcdef"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"  # what the Hub puts in a new repo


@pytest.fixture
def hub(hub_server: HubServer) -> HubServer:
    """The loopback Hub with REPO created on it (its first commit holds .gitattributes, as on the Hub)."""
    hub_server.add_commit({".gitattributes": GITATTRIBUTES}, repo=REPO, title="initial commit")
    return hub_server


def model_folder(path: Path, seed: int = 0, *, key_paths: keys.KeyPaths | None = None) -> Path:
    """A finished model folder as `mergeops publish` leaves it: weights, config, card, provenance, signature."""
    write_model(path, random_tensors(seed), config={"architectures": ["LlamaForCausalLM"], "hidden_size": 16})
    (path / "README.md").write_text(f"---\nlicense: apache-2.0\nbase_model: acme/base\n---\n# merged v{seed}\n")
    (path / "provenance.json").write_text(json.dumps({"version": seed, "inputs": []}))
    if key_paths is not None:
        sign_model_folder(path, key_paths.signing_key)
    else:
        (path / "model.sig").write_bytes(b'{"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json"}')
    return path


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def commit_posts(hub: HubServer) -> list[Request]:
    return [r for r in hub.seen("POST") if r.path.startswith(f"/api/models/{REPO}/commit/")]


def test_upload_is_one_commit_of_exactly_the_folder(hub: HubServer, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    key_paths = keys.generate_keys(tmp_path / "keys")
    folder = model_folder(tmp_path / "v0001", key_paths=key_paths)
    local = files_of(folder)
    assert {"model.safetensors", "config.json", "README.md", "provenance.json", "model.sig"} <= local.keys()
    before = len(hub.repos[REPO].commits)

    sha = upload_to_hub(folder, REPO, message="Publish merged v0001", token=TOKEN)

    history = hub.repos[REPO].commits
    assert len(history) == before + 1
    commit = history[-1]
    assert sha == commit.sha
    assert commit.title == "Publish merged v0001"
    assert commit.files == {".gitattributes": GITATTRIBUTES, **local}  # the bytes, nothing more, nothing less

    # One commit request, every file inline (the loopback Hub answers "regular" to preupload: no LFS, no xet).
    (post,) = commit_posts(hub)
    lines = [json.loads(line) for line in post.body.splitlines()]
    assert lines[0] == {"key": "header", "value": {"summary": "Publish merged v0001", "description": "",
                                                   "parentCommit": history[-2].sha}}
    assert {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines[1:]} == local
    assert {line["key"] for line in lines[1:]} == {"file"}

    assert {r.headers.get("authorization") for r in hub.requests} == {f"Bearer {TOKEN}"}
    assert TOKEN not in caplog.text

    # What the registry code downloads back is the same model, and its signature still verifies.
    registry = HubRegistry(REPO, "main", tmp_path / "downloads")
    (new,) = registry.new_commits(lambda source: not source.endswith(sha))
    assert new.sha == sha
    downloaded = registry.download(new)
    assert files_of(downloaded) == {".gitattributes": GITATTRIBUTES, **local}
    assert folder_digest(downloaded) == folder_digest(folder)
    assert verify_model_folder(downloaded, [key_paths.public_key]) == key_paths.fingerprint


def test_a_new_version_replaces_stale_files_and_republishing_commits_nothing(hub: HubServer, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    write_model(sharded, random_tensors(1), shard_bytes=4096, config={"hidden_size": 16})
    assert (sharded / "model.safetensors.index.json").is_file()
    hub.add_commit({".gitattributes": GITATTRIBUTES, **files_of(sharded)}, repo=REPO, title="v1, sharded")

    folder = model_folder(tmp_path / "v0002", seed=2)
    sha = upload_to_hub(folder, REPO, message="Publish v0002")
    assert hub.repos[REPO].commits[-1].files == {".gitattributes": GITATTRIBUTES, **files_of(folder)}

    count = len(hub.repos[REPO].commits)
    assert upload_to_hub(folder, REPO, message="Publish v0002 again") == sha  # a lost answer, retried
    assert len(hub.repos[REPO].commits) == count

    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# merged v2, better card\n")
    card = upload_to_hub(folder, REPO, message="Better card")
    assert card != sha and hub.repos[REPO].commits[-1].sha == card
    lines = [json.loads(line) for line in commit_posts(hub)[-1].body.splitlines()]
    assert [line["value"]["path"] for line in lines[1:]] == ["README.md"]  # unchanged files are not sent again
    assert hub.repos[REPO].commits[-1].files == {".gitattributes": GITATTRIBUTES, **files_of(folder)}


def test_unknown_repo_or_branch_is_a_usage_error(hub: HubServer, tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "v0001")
    with pytest.raises(UsageError, match=r"acme/missing was not found.*hf repos create acme/missing") as error:
        upload_to_hub(folder, "acme/missing", message="Publish")
    assert not isinstance(error.value, RegistryUnavailable)
    assert "acme/missing" not in hub.repos  # never created implicitly
    with pytest.raises(UsageError, match=rf"Branch 'release' of Hub repository {REPO} does not exist"):
        upload_to_hub(folder, REPO, revision="release", message="Publish")
    with pytest.raises(UsageError, match="not a valid repo id"):
        upload_to_hub(folder, "not a repo!", message="Publish")
    assert hub.seen("POST") == []


def test_a_token_that_cannot_write_is_a_usage_error(hub: HubServer, tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "v0001")
    hub.write_token = TOKEN
    with pytest.raises(UsageError, match=r"HTTP 403.*write access to acme/merged") as error:
        upload_to_hub(folder, REPO, message="Publish", token="hf_read_only")
    assert "hf_read_only" not in str(error.value)
    with pytest.raises(UsageError, match=r"HTTP 401.*write access to acme/merged"):  # no token at all
        upload_to_hub(folder, REPO, message="Publish")
    assert len(hub.repos[REPO].commits) == 1
    assert upload_to_hub(folder, REPO, message="Publish", token=TOKEN) == hub.repos[REPO].commits[-1].sha


def test_an_unavailable_hub_is_registry_unavailable(hub: HubServer, tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "v0001")
    hub.fail_status = 503
    with pytest.raises(RegistryUnavailable, match="HTTP 503") as error:
        upload_to_hub(folder, REPO, message="Publish")
    assert error.value.retry_after == 5

    hub.fail_status = None
    hub.fail_when = lambda request: 503 if request.method == "POST" and "/commit/" in request.path else None
    with pytest.raises(RegistryUnavailable, match=rf"HTTP 503 while uploading .* to {REPO}@main"):
        upload_to_hub(folder, REPO, message="Publish")
    assert len(hub.repos[REPO].commits) == 1

    hub.fail_when = None
    upload_to_hub(folder, REPO, message="Publish")
    assert len(hub.repos[REPO].commits) == 2
    hub.stop()
    with pytest.raises(RegistryUnavailable, match="cannot reach"):
        upload_to_hub(folder, REPO, message="Publish")


def test_a_commit_landing_during_the_upload_makes_the_hub_refuse_ours(hub: HubServer, tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "v0001")

    def producer_pushes_first(request: Request) -> None:
        if request.method == "POST" and "/commit/" in request.path:
            hub.add_commit({".gitattributes": GITATTRIBUTES, "other.txt": b"x"}, repo=REPO, title="someone else")

    hub.fail_when = producer_pushes_first
    with pytest.raises(RegistryUnavailable, match="another commit landed"):
        upload_to_hub(folder, REPO, message="Publish")
    assert hub.repos[REPO].commits[-1].title == "someone else"


def test_a_symlink_in_the_folder_is_refused_before_any_upload(hub: HubServer, tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "v0001")
    (tmp_path / "secret").write_text("do not publish")
    (folder / "notes.txt").symlink_to(tmp_path / "secret")
    with pytest.raises(ModelFolderError, match=r"notes\.txt is a symlink"):
        upload_to_hub(folder, REPO, message="Publish")
    assert hub.requests == []
