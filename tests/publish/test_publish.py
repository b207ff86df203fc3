"""Publishing: a verified, signed copy; protected first when the policy says so; recorded in the ledger."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from mergeops.errors import MergeopsError
from mergeops.keys import public_key_for
from mergeops.ledger import Ledger
from mergeops.ledger.audit import audit
from mergeops.ledger.lineage import lineage
from mergeops.model import folder_digest
from mergeops.pipeline import fold_checkpoint
from mergeops.policy import load_policy
from mergeops.protect import is_protected
from mergeops.publish.publish import publish
from mergeops.synthetic import LlamaShape, write_base, write_finetune
from tests.fold.streams import write_policy


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
