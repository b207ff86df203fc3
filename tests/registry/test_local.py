"""A local folder registry's scan: any folder may be hostile, and each one is scanned on its own, within bounds."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest

from mergeops.registry import local
from mergeops.registry.local import MAX_FOLDER_ENTRIES, LocalRegistry
from mergeops.synthetic import LlamaShape, write_base, write_finetune

pytestmark = pytest.mark.timeout(120)

SMALL = LlamaShape(hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1, vocab=64)


def settled() -> float:
    """A moment when every folder written so far has settled."""
    return time.time() + 3600


def write_header_bomb(folder: Path, tensors: int) -> Path:
    """A checkpoint whose weights file lists ``tensors`` one-number tensors: well-formed, under the header size cap,
    and slow to read (some 40 µs a tensor)."""
    folder.mkdir(parents=True)
    header = ",".join(f'"t.{i}":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}'
                      for i in range(tensors))
    data = ("{" + header + "}").encode()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(data)) + data + bytes(4 * tensors))
    return folder


def test_a_folder_with_more_entries_than_any_checkpoint_is_refused_and_left_alone_until_it_changes(tmp_path):
    folder = tmp_path / "registry" / "many"
    folder.mkdir(parents=True)
    for i in range(MAX_FOLDER_ENTRIES + 1):
        (folder / f"f{i}").touch()
    registry = LocalRegistry(tmp_path / "registry", settle_seconds=0)
    [refused] = registry.scan(now=settled()).refused
    assert refused.source == str(folder) and f"more than {MAX_FOLDER_ENTRIES} files" in refused.reason
    known = {(refused.source, refused.fingerprint)}
    assert registry.scan(known, now=settled()).refused == []  # refused once: not read again
    (folder / "f0").unlink()
    again = registry.scan(known, now=settled())  # changed: scanned again, and now within the bound
    assert again.refused == [] and again.incomplete == [folder]


def test_links_are_not_followed_into_folders_and_a_dangling_or_looping_one_is_just_an_entry(tmp_path):
    write_base(tmp_path / "base", SMALL, seed=0)
    ready = write_finetune(tmp_path / "base", tmp_path / "registry" / "ck", seed=1)
    os.symlink("/", ready / "everything")  # not walked: one entry
    os.symlink("nowhere", ready / "dangling")  # the old scan took it for a file being written, forever
    os.symlink("loop", ready / "loop")  # the old scan crashed on it
    found = LocalRegistry(tmp_path / "registry", settle_seconds=0).scan(now=settled())
    assert [c.path for c in found.ready] == [ready] and not found.changing and not found.refused


def test_a_link_in_the_registry_is_refused_not_followed_into_the_folder_it_names(tmp_path):
    """A link to a folder outside (a checkpoint, /proc, another stream's output) is refused by name, not read."""
    write_base(tmp_path / "base", SMALL, seed=0)
    outside = write_finetune(tmp_path / "base", tmp_path / "elsewhere", seed=1)
    registry = tmp_path / "registry"
    registry.mkdir()
    (registry / "a-linked").symlink_to(outside)
    (registry / "b-proc").symlink_to("/proc")
    found = LocalRegistry(registry, settle_seconds=0).scan(now=settled())
    assert not found.ready and not found.incomplete
    assert [(r.path.name, r.reason) for r in found.refused] == [
        (name, f"it is a symbolic link (to {target}), which is not followed into a folder; put the checkpoint itself "
               "in the registry") for name, target in (("a-linked", outside), ("b-proc", "/proc"))]
    known = {(r.source, r.fingerprint) for r in found.refused}
    assert LocalRegistry(registry, settle_seconds=0).scan(known, now=settled()).refused == []  # refused once


def test_a_folder_whose_scan_takes_longer_than_its_budget_is_refused_and_the_next_one_is_scanned(tmp_path,
                                                                                                 monkeypatch):
    write_header_bomb(tmp_path / "registry" / "a-bomb", 300_000)
    write_base(tmp_path / "base", SMALL, seed=0)
    good = write_finetune(tmp_path / "base", tmp_path / "registry" / "b-good", seed=1)
    monkeypatch.setattr(local, "FOLDER_SECONDS", 1.0)
    found = LocalRegistry(tmp_path / "registry", settle_seconds=0).scan(now=settled())
    assert [(r.path.name, r.reason) for r in found.refused] == [
        ("a-bomb", "its scan took longer than 1 s; a checkpoint's takes milliseconds")]
    assert [c.path for c in found.ready] == [good]


def test_a_folder_whose_name_is_not_utf8_is_refused_under_a_printable_name(tmp_path):
    registry = tmp_path / "registry"
    registry.mkdir()
    os.mkdir(os.fsencode(registry) + b"/ck-\xff")
    [refused] = LocalRegistry(registry, settle_seconds=0).scan(now=settled()).refused
    assert refused.source == f"{registry}/ck-\\xff" and "not UTF-8" in refused.reason
