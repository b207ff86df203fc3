"""The ledger tests' shared stream: three versions, a rejection, a publication and a protection record."""

from __future__ import annotations

import pytest

from mergeops.keys import load_signing_key
from mergeops.ledger import Ledger
from mergeops.ledger.kinds import ProtectionRecorded
from mergeops.pipeline import fold_checkpoint
from mergeops.policy import load_policy
from mergeops.publish.publish import publish
from tests.conftest import write_model
from tests.fold.streams import CONFIG, make_base, make_checkpoints, write_policy


@pytest.fixture
def stream(tmp_path):
    """Three versions, one rejection, one publication, one protection record."""
    base_path, base = make_base(tmp_path)
    checkpoints = make_checkpoints(tmp_path, base, 3, metrics=True)
    policy_path = write_policy(tmp_path, base_path, "task_arithmetic", keep=2)
    with open(policy_path, "a") as f:
        f.write(f'[streams.s.publish]\nto = "{tmp_path / "published"}"\n')
    policy = load_policy(policy_path)
    for checkpoint in checkpoints:
        assert fold_checkpoint(policy, "s", checkpoint).status == "merged"
    bad = {n: t.clone() for n, t in base.items()}
    bad["model.norm.weight"][0] = float("nan")
    assert fold_checkpoint(policy, "s", write_model(tmp_path / "bad", bad, config=CONFIG)).status == "rejected"
    publish(policy, "s")
    with Ledger.open(policy.home, load_signing_key(policy.keys.signing)) as ledger:
        ledger.record(ProtectionRecorded(ledger.head("s").output_digest, "sha256:" + "ab" * 32, "/x", "k",
                                         "mergelock-v1"))
    return policy
