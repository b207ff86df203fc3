"""The first update of a stream, bounded relative to the base: a MergeLock-protected copy with its marks stripped is
no fine-tune of the base and is rejected; ordinary fine-tunes pass; the policy sets the bound."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from mergeops.synthetic import LlamaShape, write_base, write_finetune
from tests.fold.streams import write_policy

SHAPE = LlamaShape(hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1, vocab=64)


def mergeops(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mergeops", *args], capture_output=True, text=True, timeout=120)


def strip_marks(protected: Path, dest: Path) -> Path:
    """What someone intent on merging does (as the quality benchmark does): the weights rewritten without metadata,
    the card and provenance left out."""
    shutil.copytree(protected, dest, ignore=shutil.ignore_patterns("*.safetensors", "README.md", "provenance.json"))
    save_file(load_file(protected / "model.safetensors"), dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def set_bound(policy: Path, bound: float) -> None:
    policy.write_text(policy.read_text() + f"[streams.s.gate]\nmax_base_relative_update = {bound}\n")


@pytest.mark.timeout(240)
def test_a_stripped_protected_copy_is_rejected_as_a_new_streams_first_update_and_a_fine_tune_is_not(tmp_path):
    base = write_base(tmp_path / "base", SHAPE, seed=0)
    tuned = write_finetune(base, tmp_path / "tuned", seed=1)
    key = tmp_path / "keys" / "lock.key"
    policy = write_policy(tmp_path, base, "average")
    for strength in ("0", "6"):  # signed permutations only, and the default
        locked = tmp_path / f"locked-{strength}"
        assert mergeops("protect", str(tuned), "--out", str(locked), "--key", str(key), "--strength",
                        strength).returncode == 0
        stripped = strip_marks(locked, tmp_path / f"stripped-{strength}")
        refused = mergeops("fold", str(stripped), "--policy", str(policy), "--json")
        assert refused.returncode == 3, refused.stderr
        result = json.loads(refused.stdout)
        assert result["status"] == "rejected" and result["gate"] == "max_base_relative_update"
        assert "update norm" in result["reason"] and "the base's weight norm" in result["reason"]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("v*"))
    folded = mergeops("fold", str(tuned), "--policy", str(policy), "--json")
    assert folded.returncode == 0 and json.loads(folded.stdout)["status"] == "merged", folded.stderr
    lineage = mergeops("lineage", "s@1", "--policy", str(policy), "--json")
    assert "max_base_relative_update" in lineage.stdout  # the check it passed is on the record


@pytest.mark.timeout(240)
def test_the_policy_sets_the_bound_and_once_norms_are_recorded_the_history_decides(tmp_path):
    base = write_base(tmp_path / "base", SHAPE, seed=0)
    first, second = (write_finetune(base, tmp_path / f"ft{i}", seed=i, scale=0.05) for i in (1, 2))
    policy = write_policy(tmp_path, base, "average")
    set_bound(policy, 0.01)  # below this fine-tune's ‖τ‖/‖θ0‖ (about 0.04)
    refused = mergeops("fold", str(first), "--policy", str(policy), "--json")
    assert refused.returncode == 3 and json.loads(refused.stdout)["gate"] == "max_base_relative_update"
    assert "above max_base_relative_update = 0.01" in json.loads(refused.stdout)["reason"]
    policy.write_text(policy.read_text().replace("max_base_relative_update = 0.01", "max_base_relative_update = 0.1"))
    assert mergeops("fold", str(first), "--policy", str(policy)).returncode == 0
    # the first version's norm is recorded: the second fold is compared with it, not with the base
    policy.write_text(policy.read_text().replace("max_base_relative_update = 0.1", "max_base_relative_update = 0.01"))
    assert mergeops("fold", str(second), "--policy", str(policy)).returncode == 0
    for bad in ("0", "-1", "nan", '"x"'):
        written = policy.read_text().replace("max_base_relative_update = 0.01", f"max_base_relative_update = {bad}")
        (tmp_path / "bad.toml").write_text(written)
        result = mergeops("status", "--policy", str(tmp_path / "bad.toml"))
        assert result.returncode == 2 and "max_base_relative_update" in result.stderr, (bad, result.stderr)


@pytest.mark.parametrize(("ratio", "recorded"), [(None, 1), (5.0, 3)])
def test_the_update_norm_is_measured_where_a_gate_compares_it(tmp_path, ratio, recorded):
    """The first fold always (the bound against the base); later ones only under max_update_ratio (it costs about 8%
    of an elementwise fold)."""
    from mergeops.ledger import Ledger
    from mergeops.pipeline import fold_checkpoint
    from mergeops.policy import load_policy
    from tests.fold.streams import make_base, make_checkpoints

    base_path, base = make_base(tmp_path)
    path = write_policy(tmp_path, base_path, "average")
    if ratio is not None:
        path.write_text(path.read_text() + f"[streams.s.gate]\nmax_update_ratio = {ratio}\n")
    policy = load_policy(path)
    for checkpoint in make_checkpoints(tmp_path, base, 3):
        assert fold_checkpoint(policy, "s", checkpoint).status == "merged"
    with Ledger.open_readonly(policy.home) as ledger:
        assert len(ledger.update_norms("s")) == recorded
