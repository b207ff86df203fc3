"""The commit stage: a stream's folders on disk, and a version made permanent (or, failing that, gone)."""

from __future__ import annotations

import errno
import os

import pytest

import mergeops.commit.commit
from mergeops.commit.folders import SPARE_STATE, StreamFolders
from mergeops.commit.owner import OWNER_FILE, NotOurFolder
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


def test_pruning_removes_a_link_named_like_a_version_and_not_what_it_points_at(tmp_path):
    folders = StreamFolders.of(tmp_path / "home", "s", tmp_path / "out")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "model.safetensors").write_bytes(b"weights")
    for version in (2, 3):
        (folders.output / f"v{version:04d}").mkdir(parents=True)
    (folders.output / "v0001").symlink_to(tmp_path / "elsewhere")
    folders.state_root.mkdir(parents=True)
    folders.prune(head=3, keep=1)
    assert sorted(p.name for p in folders.output.iterdir()) == ["v0003"]
    assert (tmp_path / "elsewhere" / "model.safetensors").read_bytes() == b"weights"


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


def snapshot(folder):
    """Every entry below ``folder``: its kind and, for a file, its bytes (links by where they point)."""
    return {p.relative_to(folder).as_posix(): os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file()
            else "folder" for p in sorted(folder.rglob("*"))}


def test_a_second_home_sharing_an_output_folder_is_refused_and_the_first_keeps_its_versions(tmp_path):
    base_path, base = make_base(tmp_path)
    checkpoints = make_checkpoints(tmp_path, base, 3)
    shared = tmp_path / "shared"
    policies = []
    for home in ("first", "second"):  # two policies, each with a home of its own, writing to one folder
        path = write_policy(tmp_path / home, base_path, "average")
        path.write_text(path.read_text().replace('output = "out"', f'output = "{shared}"'))
        policies.append(load_policy(path))
    first, second = policies
    for checkpoint in checkpoints[:2]:
        assert fold_checkpoint(first, None, checkpoint).status == "merged"
    before = snapshot(shared)
    with pytest.raises(NotOurFolder, match=rf"{shared} is the output folder of stream 's' of the home "
                                           rf"{tmp_path / 'first' / 'state'}"):
        fold_checkpoint(second, None, checkpoints[2])
    assert snapshot(shared) == before  # the first home's v0001, v0002 and latest, byte for byte
    with Ledger.open_readonly(second.home) as ledger:
        assert ledger.head("s") is None
    assert fold_checkpoint(first, None, checkpoints[2]).version == 3  # the first home goes on


def test_an_output_folder_mergeops_did_not_create_is_refused_and_nothing_in_it_is_removed(tmp_path):
    base_path, base = make_base(tmp_path)
    checkpoint = make_checkpoints(tmp_path, base, 1)[0]
    policy = load_policy(write_policy(tmp_path, base_path, "average"))
    (tmp_path / "out" / "v0001").mkdir(parents=True)  # what a fold would take for its own crash's leftover
    (tmp_path / "out" / "v0001" / "model.safetensors").write_bytes(b"someone's model")
    (tmp_path / "out" / "README.md").write_text("my folder")
    before = snapshot(tmp_path / "out")
    with pytest.raises(NotOurFolder, match="which mergeops did not write there for stream 's'"):
        fold_checkpoint(policy, None, checkpoint)
    assert snapshot(tmp_path / "out") == before


def test_an_output_folder_an_older_mergeops_wrote_is_adopted(tmp_path):
    base_path, base = make_base(tmp_path)
    checkpoints = make_checkpoints(tmp_path, base, 3)
    policy = load_policy(write_policy(tmp_path, base_path, "average", keep=1))
    for checkpoint in checkpoints[:2]:
        fold_checkpoint(policy, None, checkpoint)
    (tmp_path / "out" / OWNER_FILE).unlink()  # as an older mergeops left it: v0002 and latest
    assert fold_checkpoint(policy, None, checkpoints[2]).version == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [OWNER_FILE, "latest", "v0003"]
