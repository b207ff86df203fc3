"""`audit` while folds commit and prune: one snapshot of the ledger, no alarm about what a write committed after it,
and tampering still found."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from mergeops.keys import public_key_for
from mergeops.ledger import Ledger
from mergeops.ledger.audit import audit
from mergeops.policy import load_policy
from tests.fold.streams import make_base, make_checkpoints, write_policy


def audit_now(policy, settle_seconds: float = 30.0):
    with Ledger.open_readonly(policy.home) as ledger:
        return audit(ledger, public_key_for(policy.keys), folders={"s": [policy.streams["s"].output]},
                     settle_seconds=settle_seconds)


@pytest.mark.timeout(400)
def test_audits_during_folds_that_commit_and_prune_raise_no_alarm_and_tampering_is_still_found(tmp_path):
    base_path, base = make_base(tmp_path)
    checkpoints = make_checkpoints(tmp_path, base, 7)
    policy_path = write_policy(tmp_path, base_path, "task_arithmetic", keep=1)  # every fold prunes the one before
    policy = load_policy(policy_path)

    def fold(checkpoint) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mergeops", "fold", str(checkpoint), "--policy",
                               str(policy_path)], capture_output=True, text=True, timeout=120)

    assert fold(checkpoints[0]).returncode == 0
    folds: list[subprocess.CompletedProcess[str]] = []
    folding = threading.Thread(target=lambda: folds.extend(fold(c) for c in checkpoints[1:]))
    folding.start()
    reports = []
    while folding.is_alive():
        reports.append(audit_now(policy))
    folding.join()
    assert [f.returncode for f in folds] == [0] * 6, [f.stderr for f in folds]
    assert len({r.events for r in reports}) >= 3  # the audits really ran while versions were committed and pruned
    assert [p for r in reports for p in r.problems] == []

    # with no writer running, what is wrong is found at once
    (policy.streams["s"].output / "v0007" / "config.json").write_text("{}")
    (policy.streams["s"].output / "v0008").mkdir()
    found = audit_now(policy, settle_seconds=0)
    assert {p["kind"] for p in found.problems} == {"file", "rollback"}, found.problems
