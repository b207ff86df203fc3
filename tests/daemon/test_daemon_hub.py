"""The daemon folds every new commit of a Hub repository, in order, against a loopback Hub."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mergeops.ledger import Ledger
from mergeops.model import folder_digest
from mergeops.policy import load_policy
from mergeops.synthetic import write_finetune
from tests.daemon.test_daemon import setup
from tests.registry.hub_server import hub_server_fixture  # noqa: F401 (fixture)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_every_new_commit_is_folded_in_order_and_recorded_as_repo_at_sha(tmp_path, hub_server):
    policy = setup(tmp_path)
    policy.write_text(policy.read_text().replace(
        '[[streams.s.watch]]\npath = "registry"', '[[streams.s.watch]]\nhub = "acme/finetunes"\nrevision = "main"\n'
        'poll_seconds = 1\n[[streams.s.watch]]\npath = "registry"'))
    first = write_finetune(tmp_path / "base", tmp_path / "src1", seed=1)
    second = write_finetune(tmp_path / "base", tmp_path / "src2", seed=2)
    sha1 = hub_server.add_commit(files_of(first))
    sha_pickle = hub_server.add_commit({"pytorch_model.bin": b"\x80\x04N.", "config.json": b"{}"})
    sha2 = hub_server.add_commit(files_of(second))
    result = subprocess.run([sys.executable, "-m", "mergeops", "daemon", "--policy", str(policy), "--once"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["source"] for e in events if e["event"] == "merged"] == [
        f"hf://acme/finetunes@{sha1}", f"hf://acme/finetunes@{sha2}"]
    with Ledger.open_readonly(load_policy(policy).home) as ledger:
        versions = ledger.versions("s")
        assert [v.checkpoint for v in versions] == [folder_digest(first), folder_digest(second)]
        rejected = ledger.rejections("s")
    assert len(rejected) == 1 and sha_pickle in rejected[0].source and "pickle" in rejected[0].reason
    resolves = [r for r in hub_server.requests if "/resolve/" in r.path]
    assert resolves and not any(sha_pickle in r.path for r in resolves)  # refused before downloading


def test_new_versions_are_published_to_a_hub_repository_signed_as_one_commit_each(tmp_path, hub_server):
    from tests.daemon.test_daemon import drop

    policy = setup(tmp_path)
    hub_server.add_commit({".gitattributes": b""}, repo="acme/merged")  # the repository exists, empty
    with open(policy, "a") as f:
        f.write('[streams.s.publish]\nhub = "acme/merged"\nsign = true\n')
    for i in range(2):
        drop(tmp_path, f"ck{i}", seed=i + 1)
    result = subprocess.run([sys.executable, "-m", "mergeops", "daemon", "--policy", str(policy), "--once"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    published = [json.loads(line) for line in result.stdout.splitlines() if '"published"' in line]
    assert [p["version"] for p in published] == [1, 2]
    history = hub_server.repos["acme/merged"].commits
    assert len(history) == 3
    latest = history[-1].files
    assert {"model.safetensors", "config.json", "README.md", "provenance.json", "model.sig"} <= set(latest)
    assert latest["model.safetensors"] == (tmp_path / "out" / "v0002" / "model.safetensors").read_bytes()
    assert published[1]["targets"] == [f"hf://acme/merged@{history[-1].sha}"]
