"""Whose a folder is: a stream's output or publish folder is claimed with a marker naming its home and stream, and
a folder of another home or stream, or one mergeops did not create, is refused with nothing in it touched."""

from __future__ import annotations

import json
import shutil

import pytest

from mergeops.commit.owner import HOME_ID, OWNER_FILE, NotOurFolder, Owner, claim


def snapshot(folder):
    """Every entry below ``folder``: its kind and, for a file, its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}


def owner(tmp_path, stream="s", role="output", home="home"):
    return Owner(tmp_path / home, stream, role, f"[streams.{stream}].output")


def test_a_new_or_empty_folder_is_claimed_with_a_marker_naming_home_stream_and_role(tmp_path):
    folder = tmp_path / "merged" / "s"
    claim(folder, owner(tmp_path), lambda: pytest.fail("a new folder needs no ledger"))
    marker = json.loads((folder / OWNER_FILE).read_text())
    home_id = (tmp_path / "home" / HOME_ID).read_text().strip()
    assert marker == {"home": "../../home", "home_id": home_id, "stream": "s", "role": "output"} and len(home_id) == 32
    claim(folder, owner(tmp_path), lambda: pytest.fail("a marked folder needs no ledger"))  # ours: taken again
    (tmp_path / "empty").mkdir()
    claim(tmp_path / "empty", owner(tmp_path), set)
    assert (tmp_path / "empty" / OWNER_FILE).is_file()


@pytest.mark.parametrize("other", [{"stream": "t"}, {"role": "publish"}, {"home": "home2"}])
def test_a_folder_of_another_home_stream_or_role_is_refused(tmp_path, other):
    folder = tmp_path / "out"
    claim(folder, owner(tmp_path), set)
    (folder / "v0001").mkdir()
    (folder / "v0001" / "model.safetensors").write_bytes(b"weights")
    before = snapshot(folder)
    with pytest.raises(NotOurFolder, match=r"\(its \.mergeops-owner\.json says so\).*nothing in .* was touched"):
        claim(folder, owner(tmp_path, **other), lambda: {"v0001"})
    assert snapshot(folder) == before


@pytest.mark.parametrize("foreign", ["notes.txt", "v0002", "latest"])
def test_a_folder_mergeops_did_not_create_is_refused_and_left_alone(tmp_path, foreign):
    folder = tmp_path / "out"
    (folder / "v0001").mkdir(parents=True)
    (folder / "v0001" / "model.safetensors").write_bytes(b"someone else's weights")
    (folder / foreign).mkdir() if foreign.startswith("v") else (folder / foreign).write_text("mine")
    before = snapshot(folder)
    with pytest.raises(NotOurFolder, match=f"holds '{foreign}', which mergeops did not write there"):
        claim(folder, owner(tmp_path), lambda: {"v0001"})  # the ledger records v0001 only
    assert snapshot(folder) == before and not (folder / OWNER_FILE).exists()


def test_a_folder_an_older_mergeops_wrote_is_adopted_when_it_holds_only_what_the_ledger_records(tmp_path):
    folder = tmp_path / "out"
    for name in ("v0003", "v0004"):
        (folder / name).mkdir(parents=True)
    (folder / "latest").symlink_to("v0004")
    claim(folder, owner(tmp_path), lambda: {"v0001", "v0002", "v0003", "v0004"})  # v0001-2 pruned since
    assert json.loads((folder / OWNER_FILE).read_text())["stream"] == "s"
    published = tmp_path / "published"
    (published / "latest").mkdir(parents=True)  # a publish folder has no latest link: this is not ours
    with pytest.raises(NotOurFolder, match="holds 'latest'"):
        claim(published, owner(tmp_path, role="publish"), lambda: {"v0001"})


@pytest.mark.parametrize("marker", [b"", b"[]", b'{"home": 1}', b"\xff\xfe", b"{" * 10_000])
def test_a_damaged_marker_is_refused_not_trusted(tmp_path, marker):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / OWNER_FILE).write_bytes(marker)
    with pytest.raises(NotOurFolder, match=r"\.mergeops-owner\.json"):
        claim(folder, owner(tmp_path), set)
    assert (folder / OWNER_FILE).read_bytes() == marker


def test_a_file_or_a_link_where_the_folder_should_be_is_refused(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(NotOurFolder, match="is not a folder mergeops can own"):
        claim(tmp_path / "file", owner(tmp_path), set)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(NotOurFolder, match="is not a folder mergeops can own"):
        claim(tmp_path / "link", owner(tmp_path), set)
    assert (tmp_path / "file").read_text() == "not a folder" and not any((tmp_path / "elsewhere").iterdir())


def test_a_home_moved_together_with_its_folders_keeps_them(tmp_path):
    claim(tmp_path / "a" / "out", Owner(tmp_path / "a" / "home", "s", "output", "x"), set)
    (tmp_path / "a").rename(tmp_path / "b")
    claim(tmp_path / "b" / "out", Owner(tmp_path / "b" / "home", "s", "output", "x"), set)


def test_a_folder_copied_without_its_home_into_another_project_is_refused_by_the_home_found_there(tmp_path):
    # Two projects of one layout (home = "state", output = "merged/s"): the marker of the first project's folder,
    # copied into the second, names the second's home by its relative path, but not by its id.
    claim(tmp_path / "a" / "merged" / "s", Owner(tmp_path / "a" / "state", "s", "output", "x"), set)
    (tmp_path / "a" / "merged" / "s" / "v0001").mkdir()
    (tmp_path / "a" / "merged" / "s" / "v0001" / "model.safetensors").write_bytes(b"the first project's weights")
    shutil.copytree(tmp_path / "a" / "merged", tmp_path / "b" / "merged", symlinks=True)
    before = snapshot(tmp_path / "b" / "merged" / "s")
    with pytest.raises(NotOurFolder, match=r"written by another home that lay where .* a copy of another project"):
        claim(tmp_path / "b" / "merged" / "s", Owner(tmp_path / "b" / "state", "s", "output", "x"), set)
    assert snapshot(tmp_path / "b" / "merged" / "s") == before


def test_a_marker_from_before_homes_had_ids_is_adopted_only_when_the_ledger_records_what_the_folder_holds(tmp_path):
    folder = tmp_path / "b" / "merged" / "s"
    (folder / "v0001").mkdir(parents=True)
    (folder / OWNER_FILE).write_text(json.dumps({"home": "../../state", "stream": "s", "role": "output"}))
    ours = Owner(tmp_path / "b" / "state", "s", "output", "x")
    before = snapshot(folder)
    with pytest.raises(NotOurFolder, match="holds 'v0001', which mergeops did not write there"):
        claim(folder, ours, set)  # copied from another project: this home's ledger records nothing there
    assert snapshot(folder) == before
    claim(folder, ours, lambda: {"v0001"})
    home_id = (tmp_path / "b" / "state" / HOME_ID).read_text().strip()
    assert json.loads((folder / OWNER_FILE).read_text())["home_id"] == home_id


def test_a_claim_killed_before_its_marker_was_in_place_is_finished_by_the_next(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / f".{OWNER_FILE}.tmp-4242").write_text('{"home": "../home"')  # killed while writing it
    claim(folder, owner(tmp_path), set)
    assert [p.name for p in folder.iterdir()] == [OWNER_FILE]
    assert json.loads((folder / OWNER_FILE).read_text())["stream"] == "s"
