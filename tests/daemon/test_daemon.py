"""The daemon as users run it: a real process, real signals, real files in a real registry."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mergeops.commit.owner import OWNER_FILE
from mergeops.daemon.loop import ATTEMPTS
from mergeops.keys import generate_keys
from mergeops.ledger import Ledger
from mergeops.model import ModelWriter, TensorSpec, folder_digest
from mergeops.pipeline import fold_checkpoint
from mergeops.policy import load_policy
from mergeops.synthetic import LlamaShape, write_base, write_finetune

SMALL = LlamaShape(hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1, vocab=64)
SLOWER = LlamaShape(hidden=256, layers=4, intermediate=688, heads=4, kv_heads=2, vocab=2048)


def setup(root: Path, shape: LlamaShape = SMALL, method: str = "average", settle: float = 0.3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_base(root / "base", shape, seed=0)
    generate_keys(root / "keys")
    (root / "registry").mkdir()
    policy = root / "policy.toml"
    policy.write_text(f'home = "state"\n[keys]\nsigning = "keys/signing.pem"\n[streams.s]\nbase = "base"\n'
                      f'method = "{method}"\noutput = "out"\nkeep = 2\n[[streams.s.watch]]\npath = "registry"\n'
                      f"settle_seconds = {settle}\n")
    return policy


def drop(root: Path, name: str, seed: int) -> Path:
    """A producer that publishes atomically: write under a dot-name, then rename into the registry."""
    staging = write_finetune(root / "base", root / "registry" / f".{name}.partial", seed=seed)
    return staging.rename(root / "registry" / name)


def daemon(policy: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mergeops", "daemon", "--policy", str(policy), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_once(policy: Path, expect: int = 0) -> list[dict]:
    result = subprocess.run([sys.executable, "-m", "mergeops", "daemon", "--policy", str(policy), "--once"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == expect, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def folded_sources(policy: Path) -> list[str]:
    loaded = load_policy(policy)
    with Ledger.open_readonly(loaded.home) as ledger:
        return [Path(v.source).name for v in ledger.versions("s")]


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def status(policy: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "mergeops", "status", "--policy", str(policy), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def rejections(policy: Path) -> list[dict]:
    listed = subprocess.run([sys.executable, "-m", "mergeops", "rejections", "--policy", str(policy), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)["failures"]


def retry(policy: Path, *args: str) -> str:
    released = subprocess.run([sys.executable, "-m", "mergeops", "retry", "--policy", str(policy), *args],
                              capture_output=True, text=True, timeout=60)
    assert released.returncode == 0, released.stderr
    return released.stdout


def stop(process: subprocess.Popen, seconds: float = 10) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=seconds) == 0


def test_once_folds_every_complete_checkpoint_in_order_and_never_a_partial_one(tmp_path):
    policy = setup(tmp_path)
    for i in range(3):
        drop(tmp_path, f"ck{i}", seed=i + 1)
    partial = write_finetune(tmp_path / "base", tmp_path / "partial-src", seed=9)
    shutil.copytree(partial, tmp_path / "registry" / "partial")
    weights = tmp_path / "registry" / "partial" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # a producer that stopped half-way
    (tmp_path / "registry" / "ignored.tmp").mkdir()
    lines = run_once(policy)
    assert folded_sources(policy) == ["ck0", "ck1", "ck2"]
    assert any(line["event"] == "incomplete" and line["source"].endswith("partial") for line in lines)
    assert all(isinstance(line["time"], str) for line in lines)  # structured lines for journald


def test_a_checkpoint_is_folded_only_once_it_is_complete_and_settled(tmp_path):
    policy = setup(tmp_path, settle=1.0)
    source = write_finetune(tmp_path / "base", tmp_path / "src", seed=1, shard_bytes=20_000)
    target = tmp_path / "registry" / "ck"
    target.mkdir()
    shards = sorted(source.glob("model-*.safetensors"))
    process = daemon(policy)
    try:
        others = sorted(p.name for p in source.iterdir() if p not in shards)  # config, index, tokenizer
        for name in (*others, shards[0].name):  # a slow, non-atomic producer
            shutil.copyfile(source / name, target / name)
        time.sleep(2.5)  # longer than settle_seconds: settled, but a shard is missing
        assert status(policy)["streams"]["s"]["folded"] == 0
        for shard in shards[1:]:
            shutil.copyfile(shard, target / shard.name)
        wait_for(lambda: status(policy)["streams"]["s"]["folded"] == 1, 30, "the completed checkpoint")
        loaded = load_policy(policy)
        with Ledger.open_readonly(loaded.home) as ledger:
            assert ledger.head("s").checkpoint == folder_digest(source)
    finally:
        stop(process)


def test_a_running_daemon_folds_arrivals_reports_status_and_stops_on_sigterm(tmp_path):
    policy = setup(tmp_path)
    process = daemon(policy)
    try:
        wait_for(lambda: status(policy)["daemon"]["running"], 30, "the daemon's heartbeat")
        for i in range(3):
            drop(tmp_path, f"ck{i}", seed=i + 1)
            wait_for(lambda i=i: status(policy)["streams"]["s"]["latest_version"] == i + 1, 30, f"version {i + 1}")
        current = status(policy)
        assert current["streams"]["s"] | {"last_event": None} == {
            "latest_version": 3, "method": "average", "latest_output": str(tmp_path / "out" / "v0003"),
            "folded": 3, "rejected": 0, "failed": 0, "quarantined": 0, "pending": 0, "last_event": None}
        assert current["daemon"]["pid"] == process.pid and current["daemon"]["heartbeat_age_seconds"] < 30
        started = time.monotonic()
    finally:
        stop(process)
    assert time.monotonic() - started < 10
    after = status(policy)["daemon"]
    assert not after["running"] and after["status"] == "stopped"


def test_a_second_writer_on_the_same_home_is_refused_and_told_who_holds_it(tmp_path):
    policy = setup(tmp_path)
    first = daemon(policy)
    try:
        wait_for(lambda: status(policy)["daemon"]["running"], 30, "the first daemon")
        second = subprocess.run([sys.executable, "-m", "mergeops", "daemon", "--policy", str(policy)],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and f"daemon (pid {first.pid})" in second.stderr
        drop(tmp_path, "by-hand", seed=5)
        by_hand = subprocess.run([sys.executable, "-m", "mergeops", "fold", str(tmp_path / "registry" / "by-hand"),
                                  "--policy", str(policy)], capture_output=True, text=True, timeout=60)
        assert by_hand.returncode == 2 and "only one writer per home" in by_hand.stderr
    finally:
        stop(first)


def test_a_malformed_checkpoint_is_rejected_and_the_next_good_one_still_folds(tmp_path):
    policy = setup(tmp_path)
    drop(tmp_path, "a-good", seed=1)
    bad = write_finetune(tmp_path / "base", tmp_path / "registry" / ".b.partial", seed=2)
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    bad.rename(tmp_path / "registry" / "b-pickle")
    drop(tmp_path, "c-good", seed=3)
    lines = run_once(policy)
    assert folded_sources(policy) == ["a-good", "c-good"]
    rejected = [line for line in lines if line["event"] == "rejected"]
    assert len(rejected) == 1 and "pickle" in rejected[0]["reason"]
    listed = subprocess.run([sys.executable, "-m", "mergeops", "rejections", "--policy", str(policy)],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "b-pickle" in listed.stdout and "validation" in listed.stdout


def test_a_burst_of_50_arrivals_is_folded_exactly_once_in_order(tmp_path):
    policy = setup(tmp_path, settle=0.2)
    base = {}
    with ModelWriter(tmp_path / "tiny-base", [TensorSpec("w.weight", torch.float32, (4, 4))]) as writer:
        base["w.weight"] = torch.zeros(4, 4)
        writer.write("w.weight", base["w.weight"])
    policy.write_text(policy.read_text().replace('base = "base"', 'base = "tiny-base"'))
    process = daemon(policy)
    try:
        names = [f"ck{i:03d}" for i in range(50)]
        for i, name in enumerate(names):
            staging = tmp_path / "registry" / f".{name}"
            with ModelWriter(staging, [TensorSpec("w.weight", torch.float32, (4, 4))]) as writer:
                writer.write("w.weight", torch.full((4, 4), float(i)))
            staging.rename(tmp_path / "registry" / name)
            time.sleep(0.01)
        wait_for(lambda: status(policy)["streams"]["s"]["folded"] == 50, 120, "50 versions")
    finally:
        stop(process)
    assert folded_sources(policy) == names
    from tests.fold.streams import read_model

    assert torch.allclose(read_model(tmp_path / "out" / "latest")["w.weight"], torch.full((4, 4), 24.5))


def kill_at_random_moments(policy: Path, rng: random.Random, runs: int, window: tuple[float, float]) -> int:
    """Start the daemon ``runs`` times and kill -9 it at a random moment within ``window`` seconds; the kills."""
    kills = 0
    for _ in range(runs):
        process = daemon(policy)
        time.sleep(rng.uniform(*window))
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            kills += 1
        process.wait(timeout=30)
    return kills


def test_kill_9_at_random_moments_converges_to_the_uninterrupted_result(tmp_path):
    checkpoints = 6
    reference = setup(tmp_path / "reference", shape=SLOWER, method="opcm")
    for i in range(checkpoints):
        drop(tmp_path / "reference", f"ck{i}", seed=i + 1)
    run_once(reference)
    policy = setup(tmp_path / "killed", shape=SLOWER, method="opcm")
    for i in range(checkpoints):
        drop(tmp_path / "killed", f"ck{i}", seed=i + 1)
    kills = kill_at_random_moments(policy, random.Random(7), 8, (1.2, 3.0))  # after start-up (~1 s), in the folds
    run_once(policy)
    assert kills >= 4
    with Ledger.open_readonly(load_policy(reference).home) as a, Ledger.open_readonly(load_policy(policy).home) as b:
        expected, got = a.versions("s"), b.versions("s")
    assert [v.version for v in got] == list(range(1, checkpoints + 1))  # no duplicate versions
    assert [(v.checkpoint, v.output_digest) for v in got] == [(v.checkpoint, v.output_digest) for v in expected]
    assert [p for p in (tmp_path / "killed").rglob("*") if ".tmp-" in p.name] == []


def test_the_daemon_publishes_each_new_version_signed_when_the_policy_says_so(tmp_path):
    policy = setup(tmp_path)
    with open(policy, "a") as f:
        f.write(f'[streams.s.publish]\nto = "{tmp_path / "published"}"\nsign = true\n')
    for i in range(2):
        drop(tmp_path, f"ck{i}", seed=i + 1)
    lines = run_once(policy)
    assert [line["version"] for line in lines if line["event"] == "published"] == [1, 2]
    published = tmp_path / "published" / "v0002"
    verify = subprocess.run(["model_signing", "verify", "key", str(published), "--public_key",
                             str(tmp_path / "keys" / "signing.pub.pem"), "--signature", str(published / "model.sig")],
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stderr
    assert folder_digest(published) == folder_digest(tmp_path / "out" / "v0002")


def test_an_arrival_that_failed_for_a_reason_outside_it_is_retried_at_the_next_start(tmp_path):
    policy = setup(tmp_path)
    drop(tmp_path, "ck0", seed=1)
    (tmp_path / "base").rename(tmp_path / "base-away")  # e.g. the base's mount is missing for a while
    failed = [line for line in run_once(policy, expect=1) if line["event"] == "failed"]  # --once fails with it
    assert len(failed) == 1 and "base folder" in failed[0]["error"]
    seen = status(policy)
    assert seen["streams"]["s"]["failed"] == 1 and seen["daemon"]["status"] == "stopped"
    [failure] = rejections(policy)
    assert failure["kind"] == "failed" and "base folder" in failure["reason"] and failure["checkpoint"].endswith("ck0")
    (tmp_path / "base-away").rename(tmp_path / "base")
    lines = run_once(policy)
    assert next(line for line in lines if line["event"] == "started")["retrying_failed"] == 1
    assert folded_sources(policy) == ["ck0"]


def test_a_completion_marker_holds_a_checkpoint_until_written_and_a_folded_folder_is_never_refolded(tmp_path):
    policy = setup(tmp_path)
    policy.write_text(policy.read_text() + 'marker = "COMMITTED"\n')
    ready = drop(tmp_path, "ck0", seed=1)
    lines = run_once(policy)
    assert folded_sources(policy) == [] and any(line["event"] == "incomplete" for line in lines)
    (ready / "COMMITTED").write_text("")
    run_once(policy)
    assert folded_sources(policy) == ["ck0"]
    # The producer adds its training log afterwards, then even rewrites the weights: reported, not folded again.
    time.sleep(0.4)  # past settle_seconds of the first change
    (ready / "trainer_state.json").write_text('{"global_step": 1}')
    write_finetune(tmp_path / "base", tmp_path / "other", seed=9)
    shutil.copy(tmp_path / "other" / "model.safetensors", ready / "model.safetensors")
    time.sleep(0.4)
    lines = run_once(policy)
    changed = [line for line in lines if line["event"] == "changed_after_intake"]
    assert len(changed) == 1 and changed[0]["source"] == str(ready)
    assert folded_sources(policy) == ["ck0"]


def published_versions(policy: Path) -> list[tuple[int, str, str]]:
    with Ledger.open_readonly(load_policy(policy).home) as ledger:
        rows = list(ledger.db.query("SELECT * FROM publications"))
        return sorted((r["version"], str(ledger.located(r["target"])), r["output_digest"]) for r in rows)


def test_a_crash_between_recording_a_version_and_queueing_its_publication_still_publishes_it(tmp_path):
    """The window a kill -9 can hit: the fold recorded version 1, the queue never heard. The redo is a duplicate of
    the head version, which was never published: it is published now, once."""
    policy = setup(tmp_path)
    with open(policy, "a") as f:
        f.write(f'[streams.s.publish]\nto = "{tmp_path / "published"}"\n')
    ready = drop(tmp_path, "ck0", seed=1)
    assert fold_checkpoint(load_policy(policy), "s", ready).status == "merged"  # recorded, not queued
    run_once(policy)
    run_once(policy)
    assert [v for v, _, _ in published_versions(policy)] == [1]


def test_a_duplicate_of_a_version_whose_publication_failed_does_not_queue_a_second_one(tmp_path):
    """The version's own failed publication stays queued and is redone at the next start; the same weights arriving
    again under another name do not add a second publication of it."""
    policy = setup(tmp_path)
    with open(policy, "a") as f:
        f.write(f'[streams.s.publish]\nto = "{tmp_path / "published"}"\nprotect = true\n')  # no lock key yet
    ready = drop(tmp_path, "ck0", seed=1)
    lines = run_once(policy)
    assert any(line["event"] == "publish_failed" for line in lines)
    shutil.copytree(ready, tmp_path / "registry" / "ck0-again")
    lines = run_once(policy)
    assert any(line["event"] == "duplicate" for line in lines)
    with Ledger.open_readonly(load_policy(policy).home) as ledger:
        assert len(ledger.queued("publishing")) == 1
    policy.write_text(policy.read_text().replace('signing = "keys/signing.pem"\n',
                                                 'signing = "keys/signing.pem"\nlock = "keys/lock.key"\n'))
    run_once(policy)
    assert [v for v, _, _ in published_versions(policy)] == [1]


def test_kill_9_during_auto_publish_publishes_every_version_exactly_once(tmp_path):
    checkpoints = 4
    policy = setup(tmp_path, shape=SLOWER)
    with open(policy, "a") as f:
        f.write(f'[streams.s.publish]\nto = "{tmp_path / "published"}"\nprotect = true\nsign = true\n')
    policy.write_text(policy.read_text().replace('signing = "keys/signing.pem"\n',
                                                 'signing = "keys/signing.pem"\nlock = "keys/lock.key"\n'))
    for i in range(checkpoints):
        drop(tmp_path, f"ck{i}", seed=i + 1)
    kills = kill_at_random_moments(policy, random.Random(11), 10, (1.0, 3.5))  # in the folds and publications
    run_once(policy)
    assert kills >= 4
    published = published_versions(policy)
    assert [v for v, _, _ in published] == list(range(1, checkpoints + 1))  # each once, none lost
    for version, target, digest in published:
        assert target == str(tmp_path / "published" / f"v{version:04d}") and folder_digest(Path(target)) == digest
    assert sorted(p.name for p in (tmp_path / "published").iterdir()) == [OWNER_FILE] + [f"v{v:04d}" for v in
                                                                                       range(1, 5)]
    with Ledger.open_readonly(load_policy(policy).home) as ledger:
        assert ledger.db.execute("SELECT count(*) FROM queue WHERE state != 'merged'").fetchone()[0] == 0
    audit = subprocess.run([sys.executable, "-m", "mergeops", "audit", "--policy", str(policy)], capture_output=True,
                           text=True, timeout=120)
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_status_after_a_daemon_that_could_not_start_says_why(tmp_path):
    policy = setup(tmp_path)
    drop(tmp_path, "ck0", seed=1)
    run_once(policy)
    (tmp_path / "keys" / "signing.pem").rename(tmp_path / "keys" / "elsewhere.pem")
    failed = subprocess.run([sys.executable, "-m", "mergeops", "daemon", "--policy", str(policy), "--once"],
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and "signing key" in failed.stderr
    seen = status(policy)["daemon"]
    assert not seen["running"] and seen["status"].startswith("crashed at start: ") and "signing key" in seen["status"]


def test_an_adapter_is_folded_once_its_weights_follow_its_config(tmp_path):
    """A producer that writes an adapter's config first: the folder is incomplete until its factors are there."""
    from mergeops.synthetic import write_adapter

    policy = setup(tmp_path)
    source = write_adapter(tmp_path / "base", tmp_path / "src", seed=1)
    target = tmp_path / "registry" / "adapter"
    target.mkdir()
    shutil.copyfile(source / "adapter_config.json", target / "adapter_config.json")
    lines = run_once(policy)
    assert folded_sources(policy) == []
    assert any(line["event"] == "incomplete" and line["source"].endswith("adapter") for line in lines)
    shutil.copyfile(source / "adapter_model.safetensors", target / "adapter_model.safetensors")
    run_once(policy)
    assert folded_sources(policy) == ["adapter"]
    loaded = load_policy(policy)
    with Ledger.open_readonly(loaded.home) as ledger:
        assert ledger.head("s").adapter["r"] == 8


def snapshot(folder: Path) -> dict[str, object]:
    return {p.relative_to(folder).as_posix(): os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file()
            else "folder" for p in sorted(folder.rglob("*"))}


def test_a_second_home_writing_to_the_first_homes_output_fails_its_arrival_and_deletes_nothing(tmp_path):
    first = setup(tmp_path / "first")
    drop(tmp_path / "first", "ck0", seed=1)
    run_once(first)
    shared = tmp_path / "first" / "out"
    before = snapshot(shared)
    second = setup(tmp_path / "second")  # its own home, and the first one's output folder
    second.write_text(second.read_text().replace('output = "out"', f'output = "{shared}"'))
    drop(tmp_path / "second", "ck0", seed=2)
    failed = [line for line in run_once(second, expect=1) if line["event"] == "failed"]
    assert len(failed) == 1 and f"{shared} is the output folder of stream 's' of the home" in failed[0]["error"]
    assert snapshot(shared) == before  # the first home's version, card and latest link, byte for byte
    assert status(second)["streams"]["s"]["failed"] == 1 and folded_sources(first) == ["ck0"]


@pytest.mark.timeout(400)
def test_an_arrival_that_keeps_failing_is_quarantined_after_its_attempts_until_an_operator_retries_it(tmp_path):
    policy = setup(tmp_path)
    ready = drop(tmp_path, "ck0", seed=1)
    (tmp_path / "base").rename(tmp_path / "base-away")  # a cause outside the arrival that is not fixed soon
    outcomes = [next(line for line in run_once(policy, expect=1) if line["event"] in ("failed", "quarantined"))
                for _ in range(ATTEMPTS)]  # one attempt per start
    assert [(o["event"], o["attempts"]) for o in outcomes] == [("failed", 1), ("failed", 2), ("quarantined", 3)]
    lines = run_once(policy)  # quarantined: not tried again, so this start has nothing that fails
    assert next(line for line in lines if line["event"] == "started")["retrying_failed"] == 0
    assert not any(line["event"] == "folding" for line in lines)
    seen = status(policy)["streams"]["s"]
    assert (seen["quarantined"], seen["failed"], seen["folded"]) == (1, 0, 0)
    [quarantined] = rejections(policy)
    assert (quarantined["kind"], quarantined["checkpoint"], quarantined["attempts"]) == ("quarantined", str(ready), 3)
    assert "base folder" in quarantined["reason"]
    (tmp_path / "base-away").rename(tmp_path / "base")  # the cause fixed; then the operator retries it
    assert "fold of " + str(ready) in retry(policy, str(ready))
    run_once(policy)
    assert folded_sources(policy) == ["ck0"] and rejections(policy) == []


@pytest.mark.timeout(400)
def test_a_publication_target_that_is_a_file_fails_that_publication_until_quarantined_and_the_daemon_goes_on(
        tmp_path):
    """It crashed the daemon at every start, while it redid the queued publication."""
    policy = setup(tmp_path)
    target = tmp_path / "published"
    target.write_text("a file where the policy says a folder\n")
    with open(policy, "a") as f:
        f.write(f'[streams.s.publish]\nto = "{target}"\n')
    drop(tmp_path, "ck0", seed=1)
    outcomes = [next(line for line in run_once(policy) if line["event"] in ("publish_failed", "quarantined"))
                for _ in range(ATTEMPTS)]  # folded and published at the first start; the publication redone at each
    assert [(o["event"], o["attempts"]) for o in outcomes] == [
        ("publish_failed", 1), ("publish_failed", 2), ("quarantined", 3)]
    assert outcomes[-1]["error"].startswith(f"publishing version 1: NotOurFolder: {target} is not a folder")
    assert folded_sources(policy) == ["ck0"]  # the version stays committed
    assert status(policy)["streams"]["s"]["quarantined"] == 1
    [quarantined] = rejections(policy)
    assert quarantined["kind"] == "quarantined" and quarantined["checkpoint"].endswith("ck0")
    drop(tmp_path, "ck1", seed=2)
    lines = run_once(policy)
    assert next(line for line in lines if line["event"] == "started")["resuming_publications"] == 0
    assert folded_sources(policy) == ["ck0", "ck1"]  # the next checkpoint is folded (its publication fails once)
    assert [f["kind"] for f in rejections(policy)] == ["quarantined", "failed"]
    target.unlink()
    assert "publication of" in retry(policy)
    run_once(policy)
    assert [v for v, _, _ in published_versions(policy)] == [1, 2] and rejections(policy) == []


def _deep_tree(root: Path) -> None:
    folder = root / "registry" / "a-deep"
    for _ in range(1200):  # deeper than Python's recursion limit: the old scan, and the registry's watch, crashed
        folder = folder / "d"
        folder.mkdir(parents=True)


def remove_deep_tree(top: Path) -> None:
    """What shutil.rmtree cannot remove (it recurses): pytest's clean-up of old temporary folders would crash."""
    bottom = top
    while (bottom / "d").is_dir():
        bottom = bottom / "d"
    while bottom != top.parent:
        bottom.rmdir()
        bottom = bottom.parent


def _symlink_loop(root: Path) -> None:
    os.symlink("self", drop(root, "a-loop", seed=2) / "self")  # the old scan crashed on it


def _name_not_utf8(root: Path) -> None:
    ready = drop(root, "a-name", seed=2)
    os.rename(os.fsencode(ready), os.fsencode(ready) + b"-\xff")  # the old daemon could not record it, and crashed


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("hostile", "listed"), [(_deep_tree, None), (_symlink_loop, "a-loop"),
                                                 (_name_not_utf8, "a-name-\\xff")])
def test_a_hostile_registry_folder_is_recorded_once_and_the_good_checkpoint_behind_it_is_folded(tmp_path, hostile,
                                                                                                 listed):
    policy = setup(tmp_path)
    hostile(tmp_path)
    drop(tmp_path, "z-good", seed=3)
    try:
        for _ in range(2):  # and again at the next start
            result = subprocess.run([sys.executable, "-m", "mergeops", "daemon", "--policy", str(policy), "--once"],
                                    capture_output=True, text=True, timeout=120)
            assert result.returncode in (0, 1) and "Traceback" not in result.stderr, result.stderr  # 1: a fold failed
    finally:
        if (tmp_path / "registry" / "a-deep").is_dir():
            remove_deep_tree(tmp_path / "registry" / "a-deep")
    assert folded_sources(policy) == ["z-good"]
    found = rejections(policy)
    if listed is not None:  # recorded, with its reason: once, however often the registry is scanned
        [record] = found
        assert record["checkpoint"].endswith(listed) and record["reason"]
    else:  # no weights at its top: a checkpoint not yet written
        assert found == []


@pytest.mark.timeout(300)
def test_sigterm_in_the_middle_of_a_long_registry_scan_stops_the_daemon_within_seconds(tmp_path):
    from tests.registry.test_local import write_header_bomb

    policy = setup(tmp_path)
    write_header_bomb(tmp_path / "registry" / "bomb", 500_000)  # some 20 s to read: within the scan's budget
    time.sleep(0.5)  # settled
    process = daemon(policy)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if json.loads(line)["event"] == "started":
                break
        time.sleep(2)  # reading the bomb's header
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert status(policy)["daemon"]["status"] == "stopped"
