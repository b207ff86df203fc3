"""The ledger is the one door to its database: no SQL elsewhere, and every writer holds the home's writer lock."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import mergeops
from mergeops.errors import UsageError
from mergeops.keys import load_signing_key
from mergeops.ledger import Ledger
from mergeops.pipeline import fold_checkpoint
from mergeops.policy import load_policy
from mergeops.publish.publish import publish
from tests.fold.streams import make_base, make_checkpoints, write_policy

SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE)\b|json_extract")


def test_no_sql_outside_the_ledger_package():
    package = Path(mergeops.__file__).parent
    found = [f"{path.relative_to(package)}:{number}: {line.strip()}"
             for path in sorted(package.rglob("*.py")) if path.parent != package / "ledger"
             for number, line in enumerate(path.read_text().splitlines(), start=1) if SQL.search(line)]
    assert found == [], "SQL outside mergeops/ledger/ (add a Ledger method instead):\n" + "\n".join(found)


HOLD = """
import sys
from pathlib import Path
from mergeops.keys import load_signing_key
from mergeops.ledger import Ledger
with Ledger.open(Path(sys.argv[1]), load_signing_key(Path(sys.argv[2])), role="daemon"):
    print("open", flush=True)
    sys.stdin.read()
"""


def test_a_second_writer_is_refused_and_told_who_writes(tmp_path):
    base_path, base = make_base(tmp_path)
    first, second = make_checkpoints(tmp_path, base, 2)
    policy_path = write_policy(tmp_path, base_path, "average")
    with open(policy_path, "a") as f:
        f.write(f'[streams.s.publish]\nto = "{tmp_path / "published"}"\n')
    policy = load_policy(policy_path)
    assert fold_checkpoint(policy, "s", first).status == "merged"  # the library takes and releases the lock

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(policy.home), str(policy.keys.signing)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        refused = f"another mergeops daemon \\(pid {holder.pid}\\) writes to {re.escape(str(policy.home))}"
        with pytest.raises(UsageError, match=refused):
            fold_checkpoint(policy, "s", second)
        with pytest.raises(UsageError, match=refused):
            publish(policy, "s")
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0

    # with the lock free again, one open ledger serves several library calls
    with Ledger.open(policy.home, load_signing_key(policy.keys.signing), role="fold") as ledger:
        assert fold_checkpoint(policy, "s", second, ledger=ledger).status == "merged"
        assert publish(policy, "s", ledger=ledger).version == 2
    with Ledger.open_readonly(policy.home) as ledger:
        assert [v.version for v in ledger.versions("s")] == [1, 2]
        assert [p.target for p in ledger.publications("s", 2)] == [str(tmp_path / "published" / "v0002")]
