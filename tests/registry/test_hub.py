"""The Hub registry against a loopback Hub, through the real huggingface_hub client (no mocks)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergeops.errors import RejectedError, UsageError
from mergeops.model import ModelFolder, folder_digest
from mergeops.registry.hub import HubCommit, HubRegistry, RegistryUnavailable, hub_token
from tests.registry.hub_server import HubServer, hub_server_fixture, isolate_hub_client  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(30)

REPO = "acme/finetunes"
CONFIG = json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8}).encode()
TOKEN = "hf_test_0123456789abcdef"


def safetensors_bytes(tmp_path: Path, tensors: dict[str, torch.Tensor], name: str = "model.safetensors") -> bytes:
    path = tmp_path / "src" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path.read_bytes()


def checkpoint(tmp_path: Path, seed: int) -> dict[str, bytes]:
    g = torch.Generator().manual_seed(seed)
    tensors = {"layer.weight": torch.randn(8, 8, generator=g), "layer.bias": torch.randn(8, generator=g)}
    return {"model.safetensors": safetensors_bytes(tmp_path, tensors), "config.json": CONFIG}


def registry(tmp_path: Path, **kwargs) -> HubRegistry:
    return HubRegistry(kwargs.pop("repo", REPO), kwargs.pop("revision", "main"), tmp_path / "downloads", **kwargs)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_new_commits_lists_every_commit_oldest_first(hub_server: HubServer, tmp_path: Path) -> None:
    first = hub_server.add_commit(checkpoint(tmp_path, 1), title="run 1")
    second = hub_server.add_commit(checkpoint(tmp_path, 2), title="run 2")
    hub = registry(tmp_path)

    commits = hub.new_commits(lambda source: False)
    assert [c.sha for c in commits] == [first, second]
    assert [c.title for c in commits] == ["run 1", "run 2"]
    assert commits[0].source == f"hf://{REPO}@{first}"  # the sha, never the branch
    assert commits[0].created < commits[1].created

    assert hub.new_commits(lambda source: source == f"hf://{REPO}@{first}") == [commits[1]]
    assert hub.new_commits({c.source for c in commits}.__contains__) == []


def test_new_commits_follows_pagination(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with HubServer(page_size=2) as server:
        isolate_hub_client(monkeypatch, server.url, tmp_path / "hf-home")
        shas = [server.add_commit({"model.safetensors": b"x" * i}) for i in range(5)]
        assert [c.sha for c in registry(tmp_path).new_commits(lambda s: False)] == shas


def test_download_gives_the_pushed_files_with_a_stable_digest(hub_server: HubServer, tmp_path: Path) -> None:
    pushed = checkpoint(tmp_path, 1)
    pushed["tokenizer_config.json"] = b'{"model_max_length": 16}'
    sha = hub_server.add_commit(pushed)
    hub = registry(tmp_path)
    (commit,) = hub.new_commits(lambda s: False)
    hub.check(commit)

    folder = hub.download(commit)
    assert folder == tmp_path / "downloads" / "acme--finetunes" / sha
    assert files_of(folder) == pushed  # nothing more (no .cache/) and nothing less
    assert [p.name for p in folder.parent.iterdir()] == [sha]  # no temporary folder left beside it
    digest = folder_digest(folder)
    with ModelFolder.open(folder) as model:
        assert set(model.tensors) == {"layer.weight", "layer.bias"}

    requests = len(hub_server.requests)
    assert hub.download(commit) == folder  # already there: no Hub traffic at all
    assert len(hub_server.requests) == requests
    assert folder_digest(folder) == digest

    again = HubRegistry(REPO, "main", tmp_path / "elsewhere").download(commit)  # a real second download
    assert folder_digest(again) == digest


def test_a_sharded_commit_downloads_completely(hub_server: HubServer, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    first = {"a.weight": torch.randn(4, 4, generator=g)}
    second = {"b.weight": torch.randn(4, 4, generator=g), "b.bias": torch.randn(4, generator=g)}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"metadata": {"total_size": 4 * (16 + 16 + 4)},
             "weight_map": {**dict.fromkeys(first, names[0]), **dict.fromkeys(second, names[1])}}
    pushed = {names[0]: safetensors_bytes(tmp_path, first, names[0]),
              names[1]: safetensors_bytes(tmp_path, second, names[1]),
              "model.safetensors.index.json": json.dumps(index).encode(), "config.json": CONFIG}
    hub_server.add_commit(pushed)
    hub = registry(tmp_path)
    (commit,) = hub.new_commits(lambda s: False)

    hub.check(commit)
    folder = hub.download(commit)
    assert files_of(folder) == pushed
    with ModelFolder.open(folder) as model:
        for name, tensor in (first | second).items():
            assert torch.equal(model.read(name), tensor)


def test_an_index_naming_a_missing_shard_is_refused_before_download(hub_server: HubServer, tmp_path: Path) -> None:
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    sha = hub_server.add_commit({"model.safetensors.index.json": json.dumps(index).encode(),
                                 "model-00001-of-00002.safetensors": safetensors_bytes(tmp_path, {"a": torch.ones(2)})})
    hub = registry(tmp_path)
    (commit,) = hub.new_commits(lambda s: False)
    with pytest.raises(RejectedError, match=r"model-00002-of-00002\.safetensors"):
        hub.check(commit)
    assert {r.path.rsplit("/", 1)[-1] for r in hub_server.resolve_requests(sha)} == {"model.safetensors.index.json"}


def test_pickle_only_commit_is_refused_before_download(hub_server: HubServer, tmp_path: Path) -> None:
    sha = hub_server.add_commit({"pytorch_model.bin": b"\x80\x04pickle", "config.json": CONFIG})
    hub = registry(tmp_path)
    (commit,) = hub.new_commits(lambda s: False)

    with pytest.raises(RejectedError, match=rf"hf://{REPO}@{sha} has only pickle weights \(pytorch_model.bin\)"):
        hub.check(commit)
    assert hub_server.resolve_requests(sha) == []
    assert not (tmp_path / "downloads").exists()

    registry(tmp_path, allow_pickle=True).check(commit)  # the policy may allow it


def test_commit_without_weights_is_refused(hub_server: HubServer, tmp_path: Path) -> None:
    sha = hub_server.add_commit({".gitattributes": b"*.safetensors filter=lfs\n", "README.md": b"# card\n"})
    (commit,) = registry(tmp_path).new_commits(lambda s: False)
    with pytest.raises(RejectedError, match=f"{sha} has no model.safetensors or model.safetensors.index.json"):
        registry(tmp_path).check(commit)


def test_trainer_checkpoint_with_pickled_optimizer_state_is_accepted(hub_server: HubServer, tmp_path: Path) -> None:
    files = checkpoint(tmp_path, 1) | {"optimizer.pt": b"\x80\x04opt", "training_args.bin": b"\x80\x04args"}
    hub_server.add_commit(files)
    hub = registry(tmp_path)
    (commit,) = hub.new_commits(lambda s: False)
    hub.check(commit)
    assert files_of(hub.download(commit)) == files


def test_unreachable_hub_backs_off_then_resets(hub_server: HubServer, tmp_path: Path) -> None:
    hub_server.add_commit(checkpoint(tmp_path, 1))
    hub = registry(tmp_path)
    (commit,) = hub.new_commits(lambda s: False)

    hub_server.fail_status = 503
    with pytest.raises(RegistryUnavailable, match="HTTP 503") as first:
        hub.new_commits(lambda s: False)
    with pytest.raises(RegistryUnavailable) as second:
        hub.download(commit)
    assert (first.value.retry_after, second.value.retry_after) == (5, 10)
    assert not (tmp_path / "downloads" / "acme--finetunes" / commit.sha).exists()

    hub_server.fail_status = None
    assert hub.new_commits(lambda s: False) == [commit]  # success resets the backoff
    hub_server.stop()  # connections are now refused
    retry_after = []
    for _ in range(3):
        with pytest.raises(RegistryUnavailable, match="cannot reach") as error:
            hub.new_commits(lambda s: False)
        retry_after.append(error.value.retry_after)
    assert retry_after == [5, 10, 20]
    with pytest.raises(RegistryUnavailable):
        hub.check(commit)
    assert hub.retry_after == 80


def test_backoff_is_capped_at_five_minutes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with HubServer() as server:
        isolate_hub_client(monkeypatch, server.url, tmp_path / "hf-home")
        server.fail_status = 500
        hub = registry(tmp_path)
        waits = []
        for _ in range(9):
            with pytest.raises(RegistryUnavailable) as error:
                hub.new_commits(lambda s: False)
            waits.append(error.value.retry_after)
    assert waits == [5, 10, 20, 40, 80, 160, 300, 300, 300]


def test_unknown_repo_or_revision_is_a_usage_error(hub_server: HubServer, tmp_path: Path) -> None:
    hub_server.add_commit(checkpoint(tmp_path, 1))
    with pytest.raises(UsageError, match="acme/missing was not found") as error:
        registry(tmp_path, repo="acme/missing").new_commits(lambda s: False)
    assert not isinstance(error.value, RegistryUnavailable)
    with pytest.raises(UsageError, match=f"Revision 'nightly' of Hub repository {REPO} was not found"):
        registry(tmp_path, revision="nightly").new_commits(lambda s: False)
    with pytest.raises(UsageError, match="not a valid repo id"):
        registry(tmp_path, repo="not a repo!")
    gone = HubCommit(REPO, "f" * 40, "vanished", "2025-01-01T00:00:00+00:00")
    with pytest.raises(UsageError, match=f"{REPO}@{'f' * 40}"):
        registry(tmp_path).check(gone)


def test_a_partial_download_left_by_a_crash_is_discarded(hub_server: HubServer, tmp_path: Path) -> None:
    pushed = checkpoint(tmp_path, 1)
    sha = hub_server.add_commit(pushed)
    partial = tmp_path / "downloads" / "acme--finetunes" / f".{sha}.incomplete"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"truncated")
    (partial / "stray.txt").write_text("from the crashed run")
    hub = registry(tmp_path)
    (commit,) = hub.new_commits(lambda s: False)
    assert files_of(hub.download(commit)) == pushed
    assert not partial.exists()


def test_hf_token_is_sent_as_a_bearer_header(hub_server: HubServer, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    hub_server.add_commit(checkpoint(tmp_path, 1))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert hub_token() == TOKEN
    hub = registry(tmp_path)
    assert TOKEN not in repr(hub)
    (commit,) = hub.new_commits(lambda s: False)
    hub.check(commit)
    hub.download(commit)
    assert hub_server.resolve_requests(commit.sha)
    assert {r.headers.get("authorization") for r in hub_server.requests} == {f"Bearer {TOKEN}"}


def test_token_falls_back_to_the_systemd_credential(hub_server: HubServer, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    hub_server.add_commit(checkpoint(tmp_path, 1))
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    assert hub_token() is None  # the unit has no hf_token credential

    (credentials / "hf_token").write_text(TOKEN + "\n")
    assert hub_token() == TOKEN
    registry(tmp_path).new_commits(lambda s: False)
    assert {r.headers.get("authorization") for r in hub_server.requests} == {f"Bearer {TOKEN}"}

    monkeypatch.setenv("HF_TOKEN", "hf_from_env")  # the environment wins over the credential
    assert hub_token() == "hf_from_env"


def test_no_token_sends_no_authorization(hub_server: HubServer, tmp_path: Path) -> None:
    hub_server.add_commit(checkpoint(tmp_path, 1))
    assert hub_token() is None
    registry(tmp_path).new_commits(lambda s: False)
    assert all("authorization" not in r.headers for r in hub_server.requests)


def test_a_lora_adapter_commit_is_noticed_and_downloaded_like_a_checkpoint(hub_server: HubServer,
                                                                         tmp_path: Path) -> None:
    factors = {"base_model.model.layer.lora_A.weight": torch.ones(2, 8),
               "base_model.model.layer.lora_B.weight": torch.ones(8, 2)}
    files = {"adapter_config.json": json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}).encode(),
             "adapter_model.safetensors": safetensors_bytes(tmp_path, factors, "adapter_model.safetensors")}
    hub_server.add_commit(files)
    hub = registry(tmp_path)
    (commit,) = hub.new_commits(lambda s: False)
    hub.check(commit)
    assert files_of(hub.download(commit)) == files


def test_an_adapter_commit_without_safetensors_factors_is_refused_before_download(hub_server: HubServer,
                                                                                tmp_path: Path) -> None:
    sha = hub_server.add_commit({"adapter_config.json": b'{"peft_type": "LORA", "r": 2}',
                                 "adapter_model.bin": b"\x80\x04pickle"})
    (commit,) = registry(tmp_path).new_commits(lambda s: False)
    with pytest.raises(RejectedError, match=f"{sha} has adapter_config.json but no adapter_model.safetensors"):
        registry(tmp_path, allow_pickle=True).check(commit)
    assert hub_server.resolve_requests(sha) == []


@pytest.mark.timeout(20)
def test_a_token_credential_that_is_a_fifo_is_a_usage_error_not_a_hang(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    os.mkfifo(tmp_path / "hf_token")
    with pytest.raises(UsageError, match="hf_token: it is a FIFO, not a regular file"):
        hub_token()
