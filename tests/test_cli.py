"""The `mergeops` command, run as a real subprocess: versions, help, exit codes, JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mergeops import __version__
from tests.conftest import write_model


def mergeops(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mergeops", *args], capture_output=True, text=True, timeout=120)


def test_version():
    result = mergeops("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"mergeops {__version__}"


def test_help_lists_every_command():
    result = mergeops("--help")
    assert result.returncode == 0
    for command in ("inspect", "keygen", "fold", "daemon", "status", "lineage", "audit", "protect",
                    "unprotect", "publish", "rejections", "retry"):
        assert command in result.stdout


def test_inspect_json_is_one_document_with_the_spec_keys(tmp_path, tensors):
    model = write_model(tmp_path / "m", tensors, config={"architectures": ["LlamaForCausalLM"]})
    result = mergeops("inspect", str(model), "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert {"digest", "parameters", "tensors", "dtypes", "architecture", "files", "problems"} <= set(document)
    assert document["digest"].startswith("sha256:") and document["problems"] == []


def test_inspect_reports_an_adapter_as_one(tmp_path):
    """Rank, scale, targets, its own parameters and the full-size parameters it updates (from peft's own numbers)."""
    from tests.adapters import load, make_adapter, tiny_base

    peft = pytest.importorskip("peft")
    base = tiny_base(tmp_path, "llama")
    adapter = make_adapter(base, tmp_path / "adapter", seed=1, rank=4, alpha=8, targets=["q_proj", "down_proj"])
    model = peft.PeftModel.from_pretrained(load(base), adapter)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    adapted = {n.removesuffix(".lora_A.default.weight") for n in lora if n.endswith("lora_A.default.weight")}
    updated = sum(m.base_layer.weight.numel() for n, m in model.named_modules() if n in adapted)
    document = json.loads(mergeops("inspect", str(adapter), "--json").stdout)
    assert document["problems"] == [] and document["digest"].startswith("sha256:")
    facts = document["adapter"]
    assert (facts["r"], facts["lora_alpha"], facts["ranks"]) == (4, 8, [4])
    assert facts["parameters"] == document["parameters"] == sum(p.numel() for p in lora.values())
    assert facts["updates_parameters"] == updated
    assert facts["targets"] == sorted(n.removeprefix("base_model.model.") for n in adapted)
    table = mergeops("inspect", str(adapter))
    assert table.returncode == 0 and "LoRA of" in table.stdout and "rank 4" in table.stdout


def test_inspect_exits_1_and_names_the_problem(tmp_path, tensors):
    tensors["model.norm.weight"][0] = float("nan")
    model = write_model(tmp_path / "m", tensors)
    result = mergeops("inspect", str(model))
    assert result.returncode == 1
    assert "'model.norm.weight'" in result.stderr and "Traceback" not in result.stderr
    document = json.loads(mergeops("inspect", str(model), "--json").stdout)
    assert document["problems"][0]["tensor"] == "model.norm.weight"


def _fifo(path):  # type: ignore[no-untyped-def]
    path.unlink(missing_ok=True)
    os.mkfifo(path)


@pytest.mark.timeout(200)
@pytest.mark.parametrize(("spoil", "words"), [
    (lambda m: _fifo(m / "config.json"), "config.json is a FIFO, not a regular file"),
    (lambda m: _fifo(m / "model.safetensors"), "model.safetensors is a FIFO, not a regular file"),
    (lambda m: _fifo(m / "notes.txt"), "notes.txt is a FIFO, not a regular file"),
    (lambda m: (m / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"), "nests deeper"),
    (lambda m: (m / "config.json").write_text('{"n": ' + "9" * 5000 + "}"), "an integer of 5000 digits"),
], ids=["FIFO config", "FIFO weights", "FIFO beside them", "deep config", "huge integer"])
def test_inspect_names_a_hostile_file_as_a_problem_without_hanging(tmp_path, tensors, spoil, words):
    model = write_model(tmp_path / "m", tensors, config={"architectures": ["LlamaForCausalLM"]})
    spoil(model)
    result = mergeops("inspect", str(model), "--json")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert any(words in problem["message"] for problem in json.loads(result.stdout)["problems"]), result.stdout


def test_fold_exit_codes_and_json(tmp_path):
    from tests.fold.streams import make_base, make_checkpoints, write_policy

    base_path, base = make_base(tmp_path)
    good = make_checkpoints(tmp_path, base, 1)[0]
    bad = make_checkpoints(tmp_path / "bad", base | {"model.norm.weight": base["model.norm.weight"] * float("nan")},
                           1)[0]
    policy = str(write_policy(tmp_path, base_path, "average"))
    merged = mergeops("fold", str(good), "--policy", policy, "--json")
    assert merged.returncode == 0, merged.stderr
    document = json.loads(merged.stdout)
    assert {"status", "stream", "version", "output", "digest", "reason"} <= set(document)
    assert (document["status"], document["stream"], document["version"]) == ("merged", "s", 1)
    duplicate = mergeops("fold", str(good), "--policy", policy, "--json")
    assert (duplicate.returncode, json.loads(duplicate.stdout)["status"]) == (0, "duplicate")
    rejected = mergeops("fold", str(bad), "--policy", policy)
    assert rejected.returncode == 3 and "'model.norm.weight'" in rejected.stderr
    missing_base = write_policy(tmp_path / "p2", tmp_path / "nowhere", "average")
    usage = mergeops("fold", str(good), "--policy", str(missing_base))
    assert usage.returncode == 2 and "base folder" in usage.stderr and "Traceback" not in usage.stderr


def test_the_command_line_does_not_import_torch_until_a_command_needs_it():
    probe = subprocess.run([sys.executable, "-c", "import sys, mergeops.cli; print('torch' in sys.modules)"],
                           capture_output=True, text=True, check=True, timeout=120)
    assert probe.stdout.strip() == "False"  # `mergeops --help` answers in well under a second


def test_a_checkpoint_path_that_does_not_exist_is_a_usage_error_not_a_rejection(tmp_path):
    from tests.fold.streams import make_base, write_policy

    base_path, _ = make_base(tmp_path)
    policy = write_policy(tmp_path, base_path, "average")
    result = mergeops("fold", str(tmp_path / "no-such-checkpoint"), "--policy", str(policy))
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert not (tmp_path / "state" / "ledger.db").exists()  # nothing recorded


def test_unknown_option_is_a_usage_error():
    assert mergeops("inspect", "--bogus").returncode == 2


def test_keygen_writes_private_keys_0600_and_never_overwrites(tmp_path):
    made = mergeops("keygen", "--out", str(tmp_path / "k"))
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "k" / "signing.pem").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "k" / "lock.key").stat().st_mode & 0o777 == 0o600
    before = (tmp_path / "k" / "signing.pem").read_bytes()
    again = mergeops("keygen", "--out", str(tmp_path / "k"))
    assert again.returncode == 2 and "signing.pem" in again.stderr
    assert (tmp_path / "k" / "signing.pem").read_bytes() == before


def test_fold_without_a_signing_key_says_how_to_make_one(tmp_path):
    from tests.fold.streams import make_base, make_checkpoints

    base_path, base = make_base(tmp_path)
    checkpoint = make_checkpoints(tmp_path, base, 1)[0]
    policy = tmp_path / "p.toml"
    policy.write_text(f'[streams.s]\nbase = "{base_path}"\nmethod = "average"\n')
    result = mergeops("fold", str(checkpoint), "--policy", str(policy))
    assert result.returncode == 2 and "mergeops keygen --out" in result.stderr


def test_a_group_readable_signing_key_is_refused_with_the_fix(tmp_path):
    from tests.fold.streams import make_base, make_checkpoints, write_policy

    base_path, base = make_base(tmp_path)
    checkpoint = make_checkpoints(tmp_path, base, 1)[0]
    policy = write_policy(tmp_path, base_path, "average")
    (tmp_path / "keys" / "signing.pem").chmod(0o640)
    result = mergeops("fold", str(checkpoint), "--policy", str(policy))
    assert result.returncode == 2 and "chmod 600" in result.stderr


def test_protect_records_the_protection_and_unprotect_restores_the_weights(tmp_path):
    from mergeops.model import folder_digest
    from mergeops.synthetic import LlamaShape, write_base
    from tests.fold.streams import write_policy

    base = write_base(tmp_path / "base", LlamaShape(hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1,
                                                    vocab=64), seed=0)
    policy = write_policy(tmp_path, base, "average")
    key = tmp_path / "keys" / "lock.key"
    protected = mergeops("protect", str(base), "--out", str(tmp_path / "locked"), "--key", str(key), "--policy",
                         str(policy), "--strength", "3", "--json")
    assert protected.returncode == 0, protected.stderr
    report = json.loads(protected.stdout)
    assert report["strength"] == 3 and report["salt"] == "derived"
    assert report["movement"]["min"] >= 0.3 and report["function_check"]["invariants"]["passed"]
    assert "undoing" in report["residual_risk"]["summary"]
    restored = mergeops("unprotect", str(tmp_path / "locked"), "--out", str(tmp_path / "restored"), "--key", str(key))
    assert restored.returncode == 0, restored.stderr
    assert folder_digest(tmp_path / "restored") == folder_digest(base)
    other_key = tmp_path / "other.key"
    other_key.write_bytes(b"x" * 32)
    other_key.chmod(0o600)
    wrong = mergeops("unprotect", str(tmp_path / "locked"), "--out", str(tmp_path / "nope"), "--key", str(other_key))
    assert wrong.returncode == 2 and not (tmp_path / "nope").exists()
    bad_salt = mergeops("protect", str(base), "--out", str(tmp_path / "x"), "--key", str(key), "--salt", "fresh")
    assert bad_salt.returncode == 2 and "--salt" in bad_salt.stderr and not (tmp_path / "x").exists()
    audit = mergeops("audit", "--policy", str(policy), "--json")
    assert audit.returncode == 0 and json.loads(audit.stdout)["events"] == 1


def test_fold_rejects_a_protected_checkpoint_unless_explicitly_allowed(tmp_path):
    from mergeops.synthetic import LlamaShape, write_base
    from tests.fold.streams import write_policy

    shape = LlamaShape(hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1, vocab=64)
    base = write_base(tmp_path / "base", shape, seed=0)
    tuned = write_base(tmp_path / "tuned", shape, seed=1)
    policy = write_policy(tmp_path, base, "average")
    key = tmp_path / "keys" / "lock.key"
    assert mergeops("protect", str(tuned), "--out", str(tmp_path / "locked"), "--key", str(key)).returncode == 0
    refused = mergeops("fold", str(tmp_path / "locked"), "--policy", str(policy), "--json")
    assert refused.returncode == 3, refused.stderr
    result = json.loads(refused.stdout)
    assert result["status"] == "rejected" and result["gate"] == "mergelock"
    assert "mergelock-v2 version 2" in result["reason"]
    assert "ask its owner for the unprotected weights" in result["reason"]
    allowed = mergeops("fold", str(tmp_path / "locked"), "--policy", str(policy), "--allow-protected", "--json")
    assert allowed.returncode == 0, allowed.stderr
    stream = json.loads(allowed.stdout)["stream"]
    lineage = json.loads(mergeops("lineage", f"{stream}@1", "--policy", str(policy), "--json").stdout)
    assert "mergelock-allowed" in json.dumps(lineage)
    audit = json.loads(mergeops("audit", "--policy", str(policy), "--json").stdout)
    assert audit["events"] >= 3  # the rejection and the allowed fold are both on the record


def mounted_tmpfs(mount, options: str):
    """A tmpfs at ``mount`` to fill up for real (the tests run as root, as CI does); unmounted after the test."""
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()}); this test needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs."""
    yield from mounted_tmpfs(tmp_path / "disk", "size=3M")


@pytest.fixture
def few_inodes_disk(tmp_path):
    """A tmpfs with room for data but few files: it fills at an exact count of files, folders and links."""
    yield from mounted_tmpfs(tmp_path / "inodes", "size=64M,nr_inodes=400")


def fill(disk) -> None:
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(1 << 16))
    except OSError:
        pass
    try:
        while True:
            os.write(fd, bytes(512))
    except OSError:
        pass
    os.close(fd)


def stream_folded_once(tmp_path, *, home: str, output: str):
    """A stream of a small base with one checkpoint folded into it: its policy, and a second checkpoint to fold."""
    from mergeops.keys import generate_keys
    from mergeops.synthetic import LlamaShape, write_base, write_finetune

    shape = LlamaShape(hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1, vocab=64)
    write_base(tmp_path / "base", shape, seed=0)
    generate_keys(tmp_path / "keys")
    policy = tmp_path / "policy.toml"
    policy.write_text(f'home = "{home}"\n[keys]\nsigning = "keys/signing.pem"\n[streams.s]\nbase = "base"\n'
                      f'method = "average"\noutput = "{output}"\n')
    first, second = (write_finetune(tmp_path / "base", tmp_path / f"ck{i}", seed=i + 1) for i in range(2))
    assert mergeops("fold", str(first), "--policy", str(policy)).returncode == 0
    return policy, second


def test_on_a_full_disk_reading_commands_work_and_a_fold_says_how_much_to_free(tmp_path, small_disk):
    policy, second = stream_folded_once(tmp_path, home=f"{small_disk}/state", output=f"{small_disk}/out")
    fill(small_disk)
    for command in (["status"], ["audit"], ["lineage", "s"], ["rejections"]):
        result = mergeops(*command, "--policy", str(policy))
        assert result.returncode == 0, (command, result.stderr)
    refused = mergeops("fold", str(second), "--policy", str(policy))
    assert refused.returncode == 1 and "no space left on" in refused.stderr and "MB and run again" in refused.stderr
    assert "Traceback" not in refused.stderr
    (small_disk / "filler").unlink()
    audit = json.loads(mergeops("audit", "--policy", str(policy), "--json").stdout)
    assert audit["ok"] and audit["events"] == 2  # the stream's start and its one version: nothing half-recorded
    assert mergeops("fold", str(second), "--policy", str(policy)).returncode == 0  # it goes on once space is freed


ODD_POLICIES = {
    "deep nesting": "x = " + "[" * 100_000 + "]" * 100_000 + "\n",
    "a huge integer": "keep = 1_000_000_000_000_000_000_000_000_000_000\n",
    "a NUL in a path": 'output = "out\\u0000put"\n',
    "a stream name with a slash": None,
    "a stream watching its own output": '[[streams.s.watch]]\npath = "merged/s"\n',  # the default output
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(ODD_POLICIES))
def test_an_odd_policy_is_one_line_on_stderr_and_exit_2(tmp_path, case):
    text = 'home = "state"\n[streams.s]\nbase = "base"\nmethod = "average"\n' + (ODD_POLICIES[case] or "")
    if ODD_POLICIES[case] is None:
        text = text.replace("[streams.s]", '[streams."../s"]')
    (tmp_path / "policy.toml").write_text(text)
    for command in (["status"], ["daemon", "--once"]):
        done = mergeops(*command, "--policy", str(tmp_path / "policy.toml"))
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith(f"mergeops: error: {tmp_path / 'policy.toml'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.toml"]  # nothing was created


def entries(folder) -> int:
    return 1 + sum(1 for _ in folder.rglob("*"))


@pytest.mark.timeout(180)
def test_a_disk_that_fills_after_the_version_is_recorded_says_the_version_was_committed(tmp_path, few_inodes_disk):
    """The output disk is left room for exactly the files of one more version: the fold writes it and the ledger
    (on another disk) records it, then pointing `latest` at it needs one more file and the disk is full. The
    message says what the ledger shows: the version was committed, `latest` is behind."""
    policy, second = stream_folded_once(tmp_path, home="state", output=f"{few_inodes_disk}/out")
    fillers = []
    try:  # use every free inode, then free as many as one version folder holds
        while True:
            fillers.append(few_inodes_disk / f"f{len(fillers)}")
            fillers[-1].touch()
    except OSError:
        fillers.pop()
    for path in fillers[-entries(few_inodes_disk / "out" / "v0001"):]:
        path.unlink()
    full = mergeops("fold", str(second), "--policy", str(policy))
    assert full.returncode == 1 and "no space left on" in full.stderr, full.stderr
    assert "version 2 of stream 's' was committed" in full.stderr and "nothing was committed" not in full.stderr
    assert "`latest` still points at v0001" in full.stderr and "Traceback" not in full.stderr
    assert (few_inodes_disk / "out" / "v0002").is_dir()
    status = json.loads(mergeops("status", "--policy", str(policy), "--json").stdout)
    assert status["streams"]["s"]["latest_version"] == 2
    for path in fillers:
        path.unlink(missing_ok=True)
    again = mergeops("fold", str(second), "--policy", str(policy), "--json")  # already folded, and latest catches up
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "duplicate", again.stderr
    assert (few_inodes_disk / "out" / "latest").readlink().name == "v0002"


@pytest.mark.timeout(180)
def test_publishing_to_a_full_disk_says_nothing_was_committed_and_records_nothing(tmp_path, small_disk):
    from mergeops.synthetic import LlamaShape, write_base, write_finetune
    from tests.fold.streams import write_policy

    base = write_base(tmp_path / "base", LlamaShape(hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1,
                                                    vocab=64), seed=0)
    policy = write_policy(tmp_path, base, "average")
    policy.write_text(policy.read_text() + f'[streams.s.publish]\nto = "{small_disk}/published"\nsign = false\n')
    assert mergeops("fold", str(write_finetune(base, tmp_path / "ck", seed=1)), "--policy", str(policy)).returncode == 0
    (small_disk / "published").mkdir()
    fill(small_disk)
    refused = mergeops("publish", "--policy", str(policy))
    assert refused.returncode == 1 and "no space left on" in refused.stderr, refused.stderr
    assert "nothing was committed" in refused.stderr and "Traceback" not in refused.stderr
    assert list((small_disk / "published").iterdir()) == []
    assert json.loads(mergeops("audit", "--policy", str(policy), "--json").stdout)["events"] == 2  # no publication
