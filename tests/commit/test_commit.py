"""The commit stage: a stream's folders on disk, and a version made permanent (or, failing that, gone)."""

from __future__ import annotations

import errno

import pytest

import mergeops.commit.commit
from mergeops.commit.folders import SPARE_STATE, StreamFolders
from mergeops.ledger import Ledger
from mergeops.pipeline import fold_checkpoint
from mergeops.policy import load_policy
from tests.fold.streams import make_base, make_checkpoints, write_policy


def test_leftovers_past_the_head_are_removed_and_latest_points_where_it_is_told(tmp_path):
    folders = StreamFolders.of(tmp_path / "home", "s", tmp_path / "out")
    for root in (folders.output, folders.state_root):
        for name in ("v0001", "v0002", "v0003", ".v0003.tmp-mergeops-1"):
            (root / name).mkdir(parents=True)
    folders.remove_uncommitted(next_version=3)
    assert sorted(p.name for p in folders.output.iterdir()) == ["v0001", "v0002"]
    assert sorted(p.name for p in folders.state_root.iterdir()) == ["v0001", "v0002"]
    folders.point_latest(folders.output / "v0002")
    assert (folders.output / "latest").readlink().name == "v0002"


def test_pruning_keeps_the_newest_versions_and_makes_the_previous_state_the_spare(tmp_path):
    folders = StreamFolders.of(tmp_path / "home", "s", tmp_path / "out")
    for version in (1, 2, 3, 4):
        (folders.output / f"v{version:04d}").mkdir(parents=True)
        (folders.state_root / f"v{version:04d}").mkdir(parents=True)
    folders.prune(head=4, keep=2)
    assert sorted(p.name for p in folders.output.iterdir()) == ["v0003", "v0004"]
    assert sorted(p.name for p in folders.state_root.iterdir()) == [SPARE_STATE, "v0004"]


def test_a_card_that_cannot_be_written_leaves_no_version_and_no_record(tmp_path, monkeypatch):
    base_path, base = make_base(tmp_path)
    checkpoint = make_checkpoints(tmp_path, base, 1)[0]
    policy = load_policy(write_policy(tmp_path, base_path, "average"))

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(mergeops.commit.commit, "write_durably", full)
    with pytest.raises(Exception, match="space"):
        fold_checkpoint(policy, None, checkpoint)
    assert not (tmp_path / "out" / "v0001").exists()
    assert not (policy.home / "streams" / "s" / "state" / "v0001").exists()
    with Ledger.open_readonly(policy.home) as ledger:
        assert ledger.head("s") is None and not ledger.versions("s")
