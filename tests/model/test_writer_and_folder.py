"""Model folders round-trip through ModelWriter and ModelFolder, single-file and sharded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from mergeops.model import ModelFolder, ModelWriter, TensorSpec
from tests.conftest import random_tensors, write_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shard_bytes", [None, 1500])
def test_round_trip_is_exact(tmp_path, dtype, shard_bytes):
    tensors = random_tensors(dtype=dtype) | {"model.position_ids": torch.arange(7)}
    write_model(tmp_path / "m", tensors, shard_bytes=shard_bytes, metadata={"mergeops.stream": "s"})
    with ModelFolder.open(tmp_path / "m") as model:
        assert set(model.tensors) == set(tensors)
        for name, tensor in model.iter_tensors():
            assert tensor.dtype == tensors[name].dtype
            assert torch.equal(tensor, tensors[name]), name
    shards = sorted(p.name for p in (tmp_path / "m").glob("*.safetensors"))
    if shard_bytes:
        assert len(shards) > 1 and (tmp_path / "m" / "model.safetensors.index.json").is_file()
        assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    else:
        assert shards == ["model.safetensors"]
    for shard in shards:  # the reference reader agrees, and every shard carries the metadata
        with safe_open(tmp_path / "m" / shard, framework="pt") as f:
            assert f.metadata()["mergeops.stream"] == "s"
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                assert torch.equal(f.get_tensor(name), tensors[name])


def test_index_maps_every_tensor_to_its_shard(tmp_path, tensors):
    write_model(tmp_path / "m", tensors, shard_bytes=1000)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, shard in index["weight_map"].items():
        with safe_open(tmp_path / "m" / shard, framework="pt") as f:
            assert name in f.keys()  # noqa: SIM118


def test_tensor_larger_than_cap_gets_its_own_shard(tmp_path):
    tensors = {"big": torch.randn(100, 100), "small": torch.randn(3)}
    write_model(tmp_path / "m", tensors, shard_bytes=1000)
    with ModelFolder.open(tmp_path / "m") as model:
        assert model.tensors["big"].file != model.tensors["small"].file


def test_donor_files_are_carried_but_not_its_weights_or_training_leftovers(tmp_path, tensors):
    donor = tmp_path / "donor"
    donor.mkdir()
    for name in ("config.json", "tokenizer.json", "generation_config.json", "README.md", "optimizer.pt",
                 "trainer_state.json", "exp_avg_sq.safetensors", "model.safetensors", "provenance.json"):
        (donor / name).write_text("{}")
    (donor / "1_Pooling").mkdir()
    (donor / "1_Pooling" / "config.json").write_text("{}")
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with ModelWriter(tmp_path / "out", specs, donor=donor) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*")
                     if p.is_file())
    assert written == ["1_Pooling/config.json", "config.json", "generation_config.json", "model.safetensors",
                       "tokenizer.json"]


def test_writer_refuses_wrong_shape_or_dtype_and_leaves_nothing(tmp_path):
    specs = [TensorSpec("w", torch.float32, (2, 2))]
    with pytest.raises(ValueError, match="expected"), ModelWriter(tmp_path / "m", specs) as writer:
        writer.write("w", torch.zeros(3, 2))
    assert list(tmp_path.iterdir()) == []


def test_exception_mid_write_leaves_no_output_and_no_temp_dir(tmp_path, tensors):
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with pytest.raises(RuntimeError, match="boom"), ModelWriter(tmp_path / "m", specs) as writer:
        for i, (name, tensor) in enumerate(tensors.items()):
            if i == 2:
                raise RuntimeError("boom")
            writer.write(name, tensor)
    assert list(tmp_path.iterdir()) == []


def test_unwritten_tensor_fails_the_write(tmp_path, tensors):
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with pytest.raises(RuntimeError, match="never written"), ModelWriter(tmp_path / "m", specs) as writer:
        writer.write("model.norm.weight", tensors["model.norm.weight"])
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_never_overwritten(tmp_path, tensors):
    write_model(tmp_path / "m", tensors)
    with pytest.raises(FileExistsError):
        write_model(tmp_path / "m", tensors)


_SLOW_WRITER = """
import sys, time, torch
from mergeops.model import ModelWriter, TensorSpec
specs = [TensorSpec(f"t{i}", torch.float32, (256, 1024)) for i in range(40)]
print("ready", flush=True)
with ModelWriter(sys.argv[1], specs, shard_bytes=4 << 20) as writer:
    for i in range(40):
        writer.write(f"t{i}", torch.full((256, 1024), float(i)))
        time.sleep(0.01)
"""


@pytest.mark.parametrize("kill_after", [0.0, 0.15, 0.3, 0.45, 0.6, 0.9])
def test_kill_9_at_any_moment_leaves_no_output_or_a_complete_one(tmp_path, kill_after):
    out = tmp_path / "m"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(out)], stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"ready\n"
    time.sleep(kill_after)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    if out.exists():
        with ModelFolder.open(out) as model:
            assert len(model.tensors) == 40
            for name, tensor in model.iter_tensors():
                assert torch.equal(tensor, torch.full((256, 1024), float(name[1:])))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "m"]
    assert all(name.startswith(".m.tmp-") for name in leftovers)  # only a dot-named temp dir may remain


@pytest.mark.parametrize("order", ["layout", "reversed"])
def test_recorded_file_hashes_are_the_files_sha256_whatever_the_write_order(tmp_path, tensors, order):
    import hashlib

    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()] + [
        TensorSpec("ids", torch.int64, (3,))]
    data = tensors | {"ids": torch.arange(3)}
    with ModelWriter(tmp_path / "m", specs, shard_bytes=1500, donor=None) as writer:
        writer.extra_files["config.json"] = b"{}"
        names = writer.layout_order if order == "layout" else writer.layout_order[::-1]
        for name in names:
            writer.write(name, data[name])
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert set(writer.file_hashes) == files
    for name, digest in writer.file_hashes.items():
        assert digest == hashlib.sha256((tmp_path / "m" / name).read_bytes()).hexdigest()


@pytest.mark.parametrize("settle_after", [0, 2, 99], ids=["before-any", "midway", "after-all"])
@pytest.mark.parametrize("order", ["layout", "reversed"])
def test_provisional_metadata_settled_at_any_point_gives_final_headers_and_true_hashes(tmp_path, tensors,
                                                                                      settle_after, order):
    import hashlib

    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with ModelWriter(tmp_path / "m", specs, shard_bytes=1500, metadata={"parent": "x" * 8},
                     provisional_metadata=True) as writer:
        names = writer.layout_order if order == "layout" else writer.layout_order[::-1]
        for i, name in enumerate(names):
            if i == settle_after:
                writer.settle_metadata({"parent": "final!!!"})
            writer.write(name, tensors[name])
        if writer.metadata_is_provisional:
            writer.settle_metadata({"parent": "final!!!"})
    for name, digest in writer.file_hashes.items():
        path = tmp_path / "m" / name
        assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
        if name.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                assert f.metadata()["parent"] == "final!!!"
    with ModelFolder.open(tmp_path / "m") as model:
        for name, tensor in model.iter_tensors():
            assert torch.equal(tensor, tensors[name])


def test_provisional_metadata_must_keep_its_length_and_be_settled(tmp_path, tensors):
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with pytest.raises(ValueError, match="length"), \
            ModelWriter(tmp_path / "a", specs, metadata={"p": "x" * 8}, provisional_metadata=True) as writer:
        writer.settle_metadata({"p": "much longer than before"})
    with pytest.raises(RuntimeError, match="never settled"), \
            ModelWriter(tmp_path / "b", specs, metadata={"p": "x" * 8}, provisional_metadata=True) as writer:
        for name in writer.layout_order:
            writer.write(name, tensors[name])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tensor_reads_in_flat_pieces_that_join_into_the_whole(tmp_path, tensors, dtype):
    tensors = {n: t.to(dtype) for n, t in tensors.items()}
    write_model(tmp_path / "m", tensors, shard_bytes=1500)
    with ModelFolder.open(tmp_path / "m") as model:
        for name, tensor in tensors.items():
            stored = model.stored(name)
            pieces = [stored.read(start, min(start + 7, stored.numel)) for start in range(0, stored.numel, 7)]
            assert all(p.dim() == 1 and p.dtype == dtype for p in pieces)
            assert torch.equal(torch.cat(pieces), tensor.reshape(-1))
            assert torch.equal(stored.read(), tensor)
        with pytest.raises(IndexError, match="outside tensor"):
            model.read("model.norm.weight", 10, 17)


@pytest.mark.parametrize("shape", [(40, 16), (3, 100), (1000,), (), (5, 0), (0, 5)])
def test_pieces_are_whole_rows_that_cover_the_tensor_once(monkeypatch, shape):
    import math

    import mergeops.model.folder
    from mergeops.model import piece_bounds

    monkeypatch.setattr(mergeops.model.folder, "PIECE", 50)
    bounds = list(piece_bounds(shape))
    numel = math.prod(shape)
    row = numel // shape[0] if len(shape) > 1 and shape[0] else 1
    edges = [0, *[stop for _, stop in bounds]]
    assert [start for start, _ in bounds] == edges[:-1] and edges[-1] == numel  # consecutive, covering it
    assert all(start % row == 0 and (stop - start) % row == 0 for start, stop in bounds)  # whole rows
    assert all(stop - start <= max(50, row) for start, stop in bounds)


@pytest.mark.parametrize("order", ["layout", "interleaved"])
def test_tensors_written_in_pieces_round_trip_with_true_file_hashes(tmp_path, tensors, order):
    """Pieces of tensors in different shard groups may interleave; each file is still written (and hashed)
    front to back."""
    import hashlib

    specs = [TensorSpec(f"{kind}::{n}", t.dtype, tuple(t.shape)) for n, t in tensors.items() for kind in "ab"]
    data = {spec.name: tensors[spec.name[3:]] * (2 if spec.name[0] == "b" else 1) for spec in specs}
    with ModelWriter(tmp_path / "m", specs, shard_group=lambda spec: spec.name[0]) as writer:
        for name in tensors:
            kinds = ["a", "b"] if order == "interleaved" else []
            for start in range(0, tensors[name].numel(), 5):
                for kind in kinds:
                    flat = data[f"{kind}::{name}"].reshape(-1)
                    writer.write_piece(f"{kind}::{name}", start, flat[start:start + 5])
        if order == "layout":
            for full in writer.layout_order:
                flat = data[full].reshape(-1)
                for start in range(0, flat.numel(), 5):
                    writer.write_piece(full, start, flat[start:start + 5])
    with ModelFolder.open(tmp_path / "m") as model:
        assert {info.file for n, info in model.tensors.items() if n[0] == "a"}.isdisjoint(
            {info.file for n, info in model.tensors.items() if n[0] == "b"})
        for name, tensor in model.iter_tensors():
            assert torch.equal(tensor, data[name])
    for name, digest in writer.file_hashes.items():
        assert digest == hashlib.sha256((tmp_path / "m" / name).read_bytes()).hexdigest()


def test_pieces_must_come_in_order_and_complete_the_tensor(tmp_path, tensors):
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with pytest.raises(ValueError, match="pieces must come in order"), ModelWriter(tmp_path / "a", specs) as writer:
        writer.write_piece("model.norm.weight", 4, torch.zeros(4))
    with pytest.raises(RuntimeError, match=r"only in part.*model\.norm\.weight"), \
            ModelWriter(tmp_path / "b", specs) as writer:
        for name in writer.layout_order:
            if name != "model.norm.weight":
                writer.write(name, tensors[name])
        writer.write_piece("model.norm.weight", 0, torch.zeros(8))
    with pytest.raises(ValueError, match="overruns"), ModelWriter(tmp_path / "c", specs) as writer:
        writer.write_piece("model.norm.weight", 0, torch.zeros(17))
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("spare_bytes", [10, 100_000], ids=["smaller", "larger"])
def test_a_recycled_file_is_taken_over_and_every_byte_of_it_rewritten(tmp_path, tensors, spare_bytes):
    """A spare of any size and content becomes exactly the file a fresh write makes (same bytes, true hash)."""
    import hashlib

    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    (tmp_path / "spare").mkdir()
    (tmp_path / "spare" / "model.safetensors").write_bytes(b"\xff" * spare_bytes)
    spare_inode = (tmp_path / "spare" / "model.safetensors").stat().st_ino
    for out, recycle in (("fresh", None), ("recycled", tmp_path / "spare")):
        with ModelWriter(tmp_path / out, specs, recycle=recycle) as writer:
            for name in writer.layout_order:
                writer.write(name, tensors[name])
    fresh, recycled = (tmp_path / "fresh" / "model.safetensors"), (tmp_path / "recycled" / "model.safetensors")
    assert recycled.stat().st_ino == spare_inode and not (tmp_path / "spare" / "model.safetensors").exists()
    assert recycled.read_bytes() == fresh.read_bytes()
    assert writer.file_hashes["model.safetensors"] == hashlib.sha256(fresh.read_bytes()).hexdigest()


def test_a_spare_file_with_another_link_is_left_alone(tmp_path, tensors):
    """A hard link elsewhere (a backup made with `cp -al`) would see the file overwritten: a new file is made."""
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    (tmp_path / "spare").mkdir()
    (tmp_path / "spare" / "model.safetensors").write_bytes(b"backed up")
    os.link(tmp_path / "spare" / "model.safetensors", tmp_path / "backup")
    with ModelWriter(tmp_path / "m", specs, recycle=tmp_path / "spare") as writer:
        for name in writer.layout_order:
            writer.write(name, tensors[name])
    assert (tmp_path / "backup").read_bytes() == b"backed up"
    assert (tmp_path / "spare" / "model.safetensors").read_bytes() == b"backed up"  # not taken either
    assert (tmp_path / "m" / "model.safetensors").stat().st_ino != (tmp_path / "backup").stat().st_ino


def test_writeback_is_started_every_few_mib_written_to_a_file(tmp_path, monkeypatch):
    """Large outputs go to disk while the fold computes, so the final fsync has little left to wait for."""
    import mergeops.model.writer as writer_module

    started: list[int] = []
    monkeypatch.setattr(writer_module, "WRITEBACK_EVERY", 1000)
    monkeypatch.setattr(writer_module, "start_writeback", lambda fd: started.append(fd))
    specs = [TensorSpec("w", torch.float32, (100, 10))]  # 4000 bytes
    with ModelWriter(tmp_path / "m", specs) as writer:
        for start in range(0, 1000, 50):  # 200-byte pieces
            writer.write_piece("w", start, torch.arange(start, start + 50, dtype=torch.float32))
    assert len(started) == 4 and len(set(started)) == 1
    with ModelFolder.open(tmp_path / "m") as model:
        assert torch.equal(model.read("w").reshape(-1), torch.arange(1000, dtype=torch.float32))


def test_starting_writeback_is_a_harmless_hint_on_any_descriptor(tmp_path):
    from mergeops import durable

    if sys.platform.startswith("linux"):
        assert durable._sync_file_range() is not None  # on Linux the hint is really given
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100_000)
    with open(path, "rb+") as f:
        durable.start_writeback(f.fileno())
    read_end, write_end = os.pipe()  # not a file: the kernel refuses, and nothing is raised
    durable.start_writeback(read_end)
    os.close(read_end)
    os.close(write_end)
    assert path.read_bytes() == b"x" * 100_000
