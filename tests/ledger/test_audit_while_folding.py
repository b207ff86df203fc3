"""`audit` while folds commit and prune: one snapshot of the ledger, no alarm about what a write committed after it,
and tampering still found."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

import pytest

from mergeops.keys import public_key_for
from mergeops.ledger import Ledger
from mergeops.ledger.audit import audit
from mergeops.ledger.lock import WriterLock
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


@pytest.mark.timeout(300)
def test_an_audit_while_a_candidate_waits_for_a_long_eval_raises_no_alarm_and_a_rolled_back_version_is_found(
        tmp_path):
    """A candidate sits in the output folder, unrecorded, for as long as its eval runs (up to eval_timeout): longer
    than the audit waits for the writer. It has no provenance yet; a committed version's folder has."""
    base_path, base = make_base(tmp_path)
    first, second = make_checkpoints(tmp_path, base, 2)
    policy_path = write_policy(tmp_path, base_path, "task_arithmetic")
    assert subprocess.run([sys.executable, "-m", "mergeops", "fold", str(first), "--policy", str(policy_path)],
                          capture_output=True, timeout=120).returncode == 0
    script = tmp_path / "slow_eval.py"
    script.write_text('import json, time\ntime.sleep(12)\nprint(json.dumps({"score": 1}))\n')
    with open(policy_path, "a") as f:
        f.write(f"[streams.s.gate]\neval = '{sys.executable} {script}'\n")
    policy = load_policy(policy_path)
    output = policy.streams["s"].output
    folding = subprocess.Popen([sys.executable, "-m", "mergeops", "fold", str(second), "--policy", str(policy_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (output / "v0002").is_dir() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (output / "v0002").is_dir() and folding.poll() is None  # the candidate, its eval running
        assert audit_now(policy, settle_seconds=1).problems == []
    finally:
        _, err = folding.communicate(timeout=120)
    assert folding.returncode == 0, err

    # a version's folder left beyond the head by a ledger rolled back is found while a writer holds the lock
    shutil.copytree(output / "v0002", output / "v0003")
    with WriterLock(policy.home, "daemon"):
        found = audit_now(policy, settle_seconds=1)
    assert [p["kind"] for p in found.problems] == ["rollback"], found.problems
