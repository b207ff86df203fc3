"""Publishing: a verified, signed copy; protected first when the policy says so; recorded in the ledger."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from mergeops.commit.owner import NotOurFolder
from mergeops.errors import MergeopsError
from mergeops.keys import load_signing_key, public_key_for
from mergeops.ledger import Ledger
from mergeops.ledger.audit import audit
from mergeops.ledger.lineage import lineage
from mergeops.model import folder_digest
from mergeops.pipeline import fold_checkpoint
from mergeops.policy import load_policy
from mergeops.protect import is_protected
from mergeops.publish.publish import publish
from mergeops.synthetic import LlamaShape, write_base, write_finetune
from tests.fold.streams import make_base, make_checkpoints, write_policy


def test_a_protected_publication_is_signed_recorded_and_traceable_to_its_version(tmp_path):
    shape = LlamaShape(hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1, vocab=64)
    base = write_base(tmp_path / "base", shape, seed=0)
    path = write_policy(tmp_path, base, "average")
    text = path.read_text().replace('signing = "keys/signing.pem"',
                                    'signing = "keys/signing.pem"\nlock = "keys/lock.key"')
    path.write_text(text + f'[streams.s.publish]\nto = "{tmp_path / "published"}"\nprotect = true\n')
    policy = load_policy(path)
    for i in range(2):
        fold_checkpoint(policy, "s", write_finetune(base, tmp_path / f"ck{i}", seed=i + 1))
    publication = publish(policy, "s")
    published = tmp_path / "published" / "v0002"
    assert publication.targets == (str(published),) and is_protected(published)
    assert folder_digest(published) == publication.output_digest != folder_digest(tmp_path / "out" / "v0002")
    verify = subprocess.run(["model_signing", "verify", "key", str(published), "--public_key",
                             str(tmp_path / "keys" / "signing.pub.pem"), "--signature", str(published / "model.sig")],
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stderr
    with Ledger.open_readonly(policy.home) as ledger:
        found = lineage(ledger, str(published))
        assert (found["version"], found["found"]["as"]) == (2, "protected copy")
        assert found["found"]["protection"]["path"] == str(published)
        assert audit(ledger, public_key_for(policy.keys)).problems == []


@pytest.mark.timeout(120)
def test_a_version_file_replaced_by_a_fifo_is_refused_by_name_not_waited_on(tmp_path):
    shape = LlamaShape(hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1, vocab=64)
    base = write_base(tmp_path / "base", shape, seed=0)
    path = write_policy(tmp_path, base, "average")
    path.write_text(path.read_text() + f'[streams.s.publish]\nto = "{tmp_path / "published"}"\n')
    policy = load_policy(path)
    fold_checkpoint(policy, "s", write_finetune(base, tmp_path / "ck", seed=1))
    weights = tmp_path / "out" / "v0001" / "model.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    with pytest.raises(MergeopsError, match=re.escape(f"{weights} is a FIFO, not a regular file")):
        publish(policy, "s")
    assert not (tmp_path / "published" / "v0001").exists()
    with Ledger.open_readonly(policy.home) as ledger:
        assert "publication.recorded" not in [e["kind"] for e in ledger.events()]


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}


def folded_stream(tmp_path, versions: int = 1):
    """A stream with ``versions`` versions that publishes to ``tmp_path/published``."""
    base_path, base = make_base(tmp_path)
    path = write_policy(tmp_path, base_path, "average")
    path.write_text(path.read_text() + f'[streams.s.publish]\nto = "{tmp_path / "published"}"\n')
    policy = load_policy(path)
    for checkpoint in make_checkpoints(tmp_path, base, versions):
        fold_checkpoint(policy, "s", checkpoint)
    return policy


def test_publishing_into_a_folder_mergeops_did_not_create_is_refused_and_changes_nothing(tmp_path):
    policy = folded_stream(tmp_path)
    foreign = tmp_path / "published" / "v0001"  # someone's model, where the copy of version 1 would go
    foreign.mkdir(parents=True)
    (foreign / "model.safetensors").write_bytes(b"someone's weights")
    before = snapshot(tmp_path / "published")
    with pytest.raises(NotOurFolder, match="holds 'v0001', which mergeops did not write there"):
        publish(policy, "s")
    assert snapshot(tmp_path / "published") == before
    with Ledger.open_readonly(policy.home) as ledger:
        assert ledger.publications("s", 1) == []


def test_a_copy_in_the_publish_folder_that_mergeops_did_not_publish_is_not_replaced(tmp_path):
    policy = folded_stream(tmp_path, versions=2)
    publish(policy, "s", 1)  # the folder is ours now
    foreign = tmp_path / "published" / "v0002"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"someone's weights")
    before = snapshot(tmp_path / "published")
    with pytest.raises(NotOurFolder, match=r"v0002 is in the publish folder, but mergeops did not publish it"):
        publish(policy, "s", 2)
    assert snapshot(tmp_path / "published") == before


def test_a_copy_a_crash_left_between_its_rename_and_its_record_is_published_again(tmp_path, monkeypatch):
    policy = folded_stream(tmp_path)

    def crash(*events):
        raise KeyboardInterrupt  # the process dies after the rename, before the record

    with Ledger.open(policy.home, load_signing_key(tmp_path / "keys" / "signing.pem")) as ledger:
        monkeypatch.setattr(ledger, "record", crash)
        with pytest.raises(KeyboardInterrupt):
            publish(policy, "s", ledger=ledger)
    assert (tmp_path / "published" / "v0001" / "model.sig").is_file()  # in place, unrecorded
    note = policy.home / "streams" / "s" / "publishing.json"  # what proves the copy is the one this stream renamed
    proof = note.read_bytes()
    left = snapshot(tmp_path / "published")
    note.write_bytes(proof[:10])  # without the proof it could be anyone's: refused, and left alone
    with pytest.raises(NotOurFolder, match="mergeops did not publish it there"):
        publish(policy, "s")
    assert snapshot(tmp_path / "published") == left
    note.write_bytes(proof)
    publication = publish(policy, "s")
    assert publication.targets == (str(tmp_path / "published" / "v0001"),)
    with Ledger.open_readonly(policy.home) as ledger:
        assert len(ledger.publications("s", 1)) == 1
        assert audit(ledger, public_key_for(policy.keys)).problems == []
