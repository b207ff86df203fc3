"""The ledger: every change is a signed event, tampering with anything is found and named by audit."""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
import sqlite3
import subprocess
import sys
import threading

import pytest

from mergeops.keys import load_signing_key, public_key_for
from mergeops.ledger import Ledger
from mergeops.ledger.audit import audit
from mergeops.ledger.lineage import lineage
from mergeops.pipeline import fold_checkpoint
from mergeops.policy import load_policy
from mergeops.publish.publish import publish
from tests.fold.streams import make_base, make_checkpoints, write_policy
from tests.test_cli import fill, mounted_tmpfs


def run_audit(policy):
    with Ledger.open_readonly(policy.home) as ledger:
        return audit(ledger, public_key_for(policy.keys))


def tamper(policy, sql, params=()):
    connection = sqlite3.connect(policy.home / "ledger.db")
    with connection:
        connection.execute(sql, params)
    connection.close()


def test_an_untouched_ledger_audits_clean_and_records_every_change(stream):
    report = run_audit(stream)
    assert report.problems == [] and report.versions_checked == 2
    with Ledger.open_readonly(stream.home) as ledger:
        kinds = [e["kind"] for e in ledger.events()]
    assert kinds == ["stream.started", "version.committed", "version.committed", "version.committed",
                     "version.pruned", "checkpoint.rejected", "publication.recorded", "protection.recorded"]


@pytest.mark.parametrize(("sql", "needle"), [
    ("UPDATE streams SET base_digest = 'sha256:00'", "table streams: row name='s' column base_digest"),
    ("UPDATE checkpoints SET source = '/elsewhere' WHERE id = 2", "table checkpoints: row id=2 column source"),
    ("UPDATE checkpoints SET reason = 'fine' WHERE status = 'rejected'", "column reason"),
    ("UPDATE versions SET output_digest = 'sha256:00' WHERE version = 3", "version=3 column output_digest"),
    ("UPDATE versions SET pruned = 0 WHERE version = 1", "version=1 column pruned"),
    ("UPDATE protections SET key_fingerprint = 'other'", "table protections"),
    ("UPDATE publications SET target = '/tmp/x'", "table publications"),
    ("DELETE FROM checkpoints WHERE status = 'rejected'", "was deleted"),
    ("DELETE FROM versions WHERE version = 2", "table versions: row stream='s', version=2 was deleted"),
    ("DELETE FROM publications", "table publications"),
    ("DELETE FROM protections", "table protections"),
    ("DELETE FROM streams", "table streams"),
    ("INSERT INTO publications (id, stream, version, target) VALUES (99, 's', 3, '/evil')", "not backed by any event"),
    ("UPDATE events SET payload = replace(payload, '\"version\":2', '\"version\":7') WHERE seq = 3",
     "event 3 (version.committed) does not match its hash"),
    ("DELETE FROM events WHERE seq = 4", "event 4 is missing"),
    ("UPDATE events SET signature = '00' WHERE seq = 2", "event 2 (version.committed) has an invalid signature"),
])
def test_editing_or_deleting_anything_is_found_and_named(stream, sql, needle):
    tamper(stream, sql)
    messages = [p["message"] for p in run_audit(stream).problems]
    assert any(needle in m for m in messages), messages


def test_cutting_events_off_the_end_is_found(stream):
    tamper(stream, "DELETE FROM events WHERE seq = (SELECT max(seq) FROM events)")
    tamper(stream, "DELETE FROM protections")
    messages = [p["message"] for p in run_audit(stream).problems]
    assert any("events were deleted from the end" in m for m in messages), messages


def test_a_changed_byte_of_a_retained_weight_file_is_named_with_its_version(stream):
    weights = stream.streams["s"].output / "v0003" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    problems = run_audit(stream).problems
    assert [p["message"] for p in problems if p["kind"] == "file"] == [
        f"s v0003: file model.safetensors in {weights.parent} was changed after it was written."]


def test_audit_cli_exits_1_and_names_the_broken_record(stream):
    tamper(stream, "UPDATE versions SET path = '/nowhere' WHERE version = 3")
    result = subprocess.run([sys.executable, "-m", "mergeops", "audit", "--policy", str(stream.path), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    document = json.loads(result.stdout)
    assert not document["ok"] and any("column path" in p["message"] for p in document["problems"])


def test_lineage_by_stream_version_and_by_folder_path_after_a_copy(stream, tmp_path):
    with Ledger.open_readonly(stream.home) as ledger:
        by_name = lineage(ledger, "s")
        assert [s["version"] for s in by_name["steps"]] == [3, 2, 1]
        assert by_name["steps"][2]["retained"] is False  # pruned, but its record is kept
        assert by_name["steps"][0]["checkpoint"]["metrics"] == {"loss": 1.24, "step": 300.0}
        assert by_name["steps"][0]["signer"].startswith("sha256:")
        assert lineage(ledger, "s@2")["steps"][0]["version"] == 2
        copy = shutil.copytree(stream.streams["s"].output / "v0002", tmp_path / "somewhere" / "copy")
        found = lineage(ledger, str(copy))
        assert (found["version"], found["found"]["as"]) == (2, "version")
        published = lineage(ledger, str(tmp_path / "published" / "v0003"))
        assert published["version"] == 3 and published["publications"][0]["target"].endswith("v0003")


def test_outputs_carry_a_model_card_and_a_signed_in_toto_provenance_a_standard_verifier_accepts(stream):
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    from mergeops.keys import fingerprint
    from mergeops.model import folder_digest

    folder = stream.streams["s"].output / "v0003"
    envelope = json.loads((folder / "provenance.json").read_text())
    public = load_signing_key(stream.keys.signing).public_key()
    key = SSlibKey.from_crypto(public, keyid=fingerprint(public), scheme="ecdsa-sha2-nistp256")
    dsse = Envelope.from_dict(json.loads(json.dumps(envelope)))  # (from_dict consumes what it reads)
    assert list(dsse.verify([key], 1)) == [fingerprint(public)]  # securesystemslib's DSSE verifier accepts it
    statement = json.loads(dsse.payload)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    assert "sha256:" + statement["subject"][0]["digest"]["sha256"] == folder_digest(folder)
    build = statement["predicate"]["buildDefinition"]
    roles = [d["annotations"]["role"] for d in build["resolvedDependencies"]]
    assert roles == ["base", "previous", "checkpoint", "folded earlier", "folded earlier"]
    assert all(len(d["digest"]["sha256"]) == 64 for d in build["resolvedDependencies"])
    assert build["externalParameters"]["policy_digest"] == stream.digest
    assert not any(str(stream.path.parent) in json.dumps(d) for d in build["resolvedDependencies"])  # no local paths
    forged = json.loads(json.dumps(envelope))
    forged["payload"] = base64.b64encode(json.dumps(dict(statement, subject=[])).encode()).decode()
    with pytest.raises(Exception, match="threshold"):
        Envelope.from_dict(forged).verify([key], 1)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nbase_model_relation: merge\n")  # a local base has no Hub id to name
    assert "- mergeops\n- task_arithmetic" in card and str(stream.path.parent) not in card


def test_published_folder_verifies_with_the_model_signing_cli_and_fails_after_one_byte(stream, tmp_path):
    published = tmp_path / "published" / "v0003"
    public_key = stream.keys.signing.with_name("signing.pub.pem")
    command = ["model_signing", "verify", "key", str(published), "--public_key", str(public_key),
               "--signature", str(published / "model.sig")]
    ok = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr + ok.stdout
    weights = published / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert subprocess.run(command, capture_output=True, text=True, timeout=120).returncode != 0


_SLOW_FOLDS = """
import sys, time
import mergeops.model.writer as writer
original = writer.write_at
def slow(*args):
    time.sleep(0.01)
    original(*args)
writer.write_at = slow
from mergeops.pipeline import fold_checkpoint
from mergeops.keys import load_signing_key
from mergeops.policy import load_policy
policy = load_policy(sys.argv[1])
for path in sys.argv[2:]:
    assert fold_checkpoint(policy, "s", path).status == "merged"
"""


def test_readers_never_see_a_locked_database_or_a_half_written_fold(tmp_path):
    base_path, base = make_base(tmp_path)
    checkpoints = make_checkpoints(tmp_path, base, 6)
    policy_path = write_policy(tmp_path, base_path, "opcm")
    policy = load_policy(policy_path)
    fold_checkpoint(policy, "s", checkpoints[0])
    writer = subprocess.Popen([sys.executable, "-c", _SLOW_FOLDS, str(policy_path), *map(str, checkpoints[1:])])
    seen, errors = set(), []

    def read_repeatedly():
        while writer.poll() is None:
            try:
                with Ledger.open_readonly(policy.home) as ledger:
                    document = lineage(ledger, "s")
                    versions = [s["version"] for s in document["steps"]]
                    assert versions == list(range(versions[0], 0, -1))  # complete: every step and its checkpoint
                    seen.add(versions[0])
            except Exception as exc:
                errors.append(repr(exc))

    readers = [threading.Thread(target=read_repeatedly) for _ in range(2)]
    for reader in readers:
        reader.start()
    assert writer.wait(timeout=240) == 0
    for reader in readers:
        reader.join(timeout=30)
    assert errors == []
    assert len(seen) >= 3  # the readers really ran while versions were being committed


def test_a_changed_method_state_is_named_because_every_later_version_builds_on_it(stream):
    state = stream.home / "streams" / "s" / "state" / "v0003" / "scalars.json"
    state.write_text(state.read_text().replace('"t": 3', '"t": 30'))
    messages = [p["message"] for p in run_audit(stream).problems if p["kind"] == "state"]
    assert len(messages) == 1 and "method state" in messages[0] and "changed after it was written" in messages[0]


def messages(policy, kind: str | None = None) -> list[str]:
    return [p["message"] for p in run_audit(policy).problems if kind is None or p["kind"] == kind]


@pytest.mark.parametrize("name", ["README.md", "provenance.json"])
def test_an_edited_card_or_provenance_of_a_version_is_named(stream, name):
    card = stream.streams["s"].output / "v0003" / name
    card.write_text(card.read_text() + "\n")  # one byte more, in an otherwise valid file
    assert messages(stream, "file") == [f"s v0003: file {name} in {card.parent} was changed after it was written."]


def test_latest_pointed_back_at_an_older_version_is_named(stream):
    latest = stream.streams["s"].output / "latest"
    latest.unlink()
    latest.symlink_to("v0002")
    assert messages(stream) == [f"{latest} points at v0002, not at the newest version v0003 of stream s."]


@pytest.mark.parametrize("attack", ["flip", "replace", "delete", "add"])
def test_every_file_of_a_published_copy_is_checked(stream, tmp_path, attack):
    copy = tmp_path / "published" / "v0003"
    weights = copy / "model.safetensors"
    if attack == "flip":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
    elif attack == "replace":
        shutil.copyfile(stream.streams["s"].output / "v0002" / "model.safetensors", weights)
    elif attack == "delete":
        shutil.rmtree(copy)
    else:
        (copy / "README.md").write_text("a card of someone else's")
    found = messages(stream)
    assert found and all("s v0003 published" in m for m in found), found


def test_a_ledger_rolled_back_with_an_older_signed_head_is_caught_by_what_is_on_disk(tmp_path):
    """The attacker puts back an older ledger with its own (validly signed) head file, while v0003 and its
    published copy are still on disk."""
    base_path, base = make_base(tmp_path)
    checkpoints = make_checkpoints(tmp_path, base, 3)
    policy_path = write_policy(tmp_path, base_path, "average")
    with open(policy_path, "a") as f:
        f.write(f'[streams.s.publish]\nto = "{tmp_path / "published"}"\n')
    policy = load_policy(policy_path)
    for checkpoint in checkpoints[:2]:
        fold_checkpoint(policy, "s", checkpoint)
    saved = tmp_path / "saved"
    saved.mkdir()
    for name in ("ledger.db", "ledger-head.json"):
        shutil.copyfile(policy.home / name, saved / name)
    fold_checkpoint(policy, "s", checkpoints[2])
    publish(policy, "s")
    publish(policy, "s", as_adapter=4)  # published copies of any name count
    for name in ("ledger.db-wal", "ledger.db-shm"):
        (policy.home / name).unlink(missing_ok=True)
    for name in ("ledger.db", "ledger-head.json"):
        shutil.copyfile(saved / name, policy.home / name)
    with Ledger.open_readonly(policy.home) as ledger:
        found = audit(ledger, public_key_for(policy.keys),
                      folders={"s": [policy.streams["s"].output, tmp_path / "published"]}).problems
    assert {p["kind"] for p in found} >= {"rollback"}
    rolled = [p["where"] for p in found if p["kind"] == "rollback"]
    assert str(policy.streams["s"].output / "v0003") in rolled and str(tmp_path / "published" / "v0003") in rolled
    assert str(tmp_path / "published" / "v0003-lora-r4") in rolled


def test_a_chain_re_signed_with_another_key_and_a_swapped_public_key_is_refused(stream, tmp_path):
    from mergeops.keys import generate_keys
    from mergeops.ledger.audit import AuditReport, trusted_key

    theirs = generate_keys(tmp_path / "attacker")
    public = stream.keys.signing.with_name("signing.pub.pem")
    shutil.copyfile(theirs.public_key, public)  # the attacker re-signed everything and swapped the public key
    report = AuditReport()
    key = trusted_key(stream.keys, report)
    assert [p["kind"] for p in report.problems] == ["signer"] and "was replaced" in report.problems[0]["message"]
    assert key.public_numbers() == load_signing_key(stream.keys.signing).public_key().public_numbers()
    # An auditor without the private key pins the signer in the policy instead.
    from mergeops.keys import fingerprint

    owner = fingerprint(load_signing_key(stream.keys.signing).public_key())
    pinned = dataclasses.replace(stream.keys, signing=tmp_path / "absent" / "signing.pem", signer=owner)
    (tmp_path / "absent").mkdir()
    shutil.copyfile(theirs.public_key, tmp_path / "absent" / "signing.pub.pem")
    report = AuditReport()
    trusted_key(pinned, report)
    assert [p["kind"] for p in report.problems] == ["signer"] and owner in report.problems[0]["message"]


def test_a_copied_deployment_audits_its_own_files_not_the_original_ones(stream, tmp_path):
    copy = tmp_path.parent / f"{tmp_path.name}-copy"
    shutil.copytree(tmp_path, copy, symlinks=True)
    moved = load_policy(copy / "policy.toml")
    assert run_audit(moved).problems == []
    weights = copy / "out" / "v0003" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert [p["where"] for p in run_audit(moved).problems] == ["s v0003"]
    assert str(copy / "out" / "v0003") in run_audit(moved).problems[0]["message"]
    assert run_audit(stream).problems == []  # the original is untouched and still intact
    with Ledger.open_readonly(moved.home) as ledger:
        assert ledger.head("s").output == str(copy / "out" / "v0003")
        committed = [json.loads(e["payload"]) for e in ledger.events() if e["kind"] == "version.committed"]
    assert [c["path"] for c in committed] == ["../out/v0001", "../out/v0002", "../out/v0003"]  # relative to home
    assert committed[-1]["state_path"] == "streams/s/state/v0003"


@pytest.fixture
def small_disk(tmp_path):
    yield from mounted_tmpfs(tmp_path / "disk", "size=3M")


@pytest.mark.timeout(120)
def test_a_reader_that_cannot_read_the_ledgers_log_on_a_full_disk_does_not_say_nothing_was_committed(tmp_path,
                                                                                                     small_disk):
    """A writer killed with its records still in the write-ahead log, the log's shared-memory file gone (a copy, a
    restore) and the disk full: `status` and `audit` cannot read those records, so they cannot say none was made."""
    from mergeops.errors import DiskFullError
    from mergeops.keys import generate_keys

    generate_keys(tmp_path / "keys")
    home = small_disk / "state"
    killed = subprocess.run([sys.executable, "-c", f"""
import os
from pathlib import Path
from mergeops.keys import load_signing_key
from mergeops.ledger import Ledger
from mergeops.ledger.kinds import ProtectionRecorded
ledger = Ledger.open(Path({str(home)!r}), load_signing_key(Path({str(tmp_path / "keys" / "signing.pem")!r})))
ledger.record(ProtectionRecorded("sha256:" + "cd" * 32, "sha256:" + "ab" * 32, "/x", "k", "mergelock-v1"))
os._exit(0)  # killed: the record stays in the log
"""], capture_output=True, text=True, timeout=60)
    assert killed.returncode == 0, killed.stderr
    assert (home / "ledger.db-wal").stat().st_size > 0
    (home / "ledger.db-shm").unlink()
    fill(small_disk)
    with pytest.raises(DiskFullError) as refused:
        Ledger.open_readonly(home)
    assert "nothing was committed" not in str(refused.value)
    assert "newest records, in ledger.db-wal, cannot be read" in str(refused.value)
