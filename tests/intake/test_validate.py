"""Every malformed model folder is caught, named, and explained in one sentence."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch

from mergeops.intake.inspect import inspect_folder
from mergeops.intake.validate import problems_against_base
from mergeops.model import ModelFolder, safetensors_file
from mergeops.model.finetune import FullFineTune
from tests.conftest import random_tensors, write_model


def codes(path) -> list[str]:
    return [p.code for p in inspect_folder(path).problems]


def only_problem(path):
    problems = inspect_folder(path).problems
    assert len(problems) == 1, problems
    return problems[0]


def write_raw_safetensors(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_a_good_model_has_no_problems(tmp_path, tensors):
    model = write_model(tmp_path / "m", tensors, shard_bytes=1500, config={"architectures": ["LlamaForCausalLM"]})
    report = inspect_folder(model)
    assert report.problems == []
    assert report.tensors == len(tensors)
    assert report.parameters == sum(t.numel() for t in tensors.values())
    assert report.dtypes == {"F32": len(tensors)}
    assert report.architecture == "LlamaForCausalLM"


def test_truncated_shard(tmp_path, tensors):
    model = write_model(tmp_path / "m", tensors)
    path = model / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    problem = only_problem(model)
    assert problem.code == "truncated_file" and problem.file == "model.safetensors"
    assert "truncated" in problem.message and "copy the file again" in problem.message


def test_shard_truncated_inside_its_header(tmp_path, tensors):
    model = write_model(tmp_path / "m", tensors)
    path = model / "model.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    assert only_problem(model).code == "truncated_file"


def test_offsets_past_the_end_of_the_file(tmp_path):
    (tmp_path / "m").mkdir()
    write_raw_safetensors(tmp_path / "m" / "model.safetensors",
                          {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                           "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}, b"\0" * 16)
    problem = only_problem(tmp_path / "m")
    assert problem.code == "truncated_file" and problem.tensor == "b"
    assert "'b'" in problem.message


def test_overlapping_offsets(tmp_path):
    (tmp_path / "m").mkdir()
    write_raw_safetensors(tmp_path / "m" / "model.safetensors",
                          {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                           "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24)
    assert "overlapping_tensors" in codes(tmp_path / "m")


# Headers the reference parser (safetensors.safe_open) refuses: the problem names the tensor when our own reading
# sees what is wrong, and the header is never used (no tensor of it is listed).
REFUSED = {
    "unknown_dtype": ({"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}}, 16,
                      ["tensor 'w' has unsupported dtype 'Q4'", "has 16 bytes after the last tensor"]),
    "length_mismatch": ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, 16,
                        ["tensor 'w' occupies 16 bytes but shape [3] of F32 needs 12"]),
    "gap": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
             "b": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]}}, 40,
            ["8 unaccounted bytes before tensor 'b'"]),
    "trailing_bytes": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 24,
                       ["has 8 bytes after the last tensor"]),
    "metadata_not_strings": ({"__metadata__": {"format": 1}, "w": {"dtype": "F32", "shape": [4],
                                                                     "data_offsets": [0, 16]}}, 16,
                             ["__metadata__ that is not a map of strings"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_headers_the_reference_parser_refuses_are_named_and_not_used(tmp_path, case):
    header, data_bytes, expected = REFUSED[case]
    (tmp_path / "m").mkdir()
    write_raw_safetensors(tmp_path / "m" / "model.safetensors", header, b"\0" * data_bytes)
    folder, problems = ModelFolder.scan(tmp_path / "m")
    assert [p.code for p in problems] == ["bad_header"] * len(expected)
    for problem, words in zip(problems, expected, strict=True):
        assert problem.file == "model.safetensors" and words in problem.message
    assert folder is not None and folder.tensors == {} and folder.headers == {}


def test_what_only_the_reference_parser_refuses_is_a_problem_in_its_words(tmp_path):
    (tmp_path / "m").mkdir()
    path = tmp_path / "m" / "model.safetensors"
    raw = b'{"w": {"dtype": "F32", "shape": [0, 18446744073709551616], "data_offsets": [0, 0]}}'  # 2**64: no usize
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    folder, problems = ModelFolder.scan(tmp_path / "m")
    assert [p.code for p in problems] == ["bad_header"]
    assert problems[0].message.startswith("model.safetensors is not a valid safetensors file (the safetensors "
                                          "library says: invalid JSON in header")
    assert "copy the file again" in problems[0].message
    assert folder is not None and folder.tensors == {}


def test_a_file_that_changes_while_it_is_read_is_still_being_written(tmp_path, tensors, monkeypatch):
    model = write_model(tmp_path / "m", tensors)
    weights = model / "model.safetensors"
    real = safetensors_file.safe_open

    def producer_still_writing(path, framework):
        weights.write_bytes(weights.read_bytes()[:-100])  # between our read of the header and the reference's
        return real(path, framework=framework)

    monkeypatch.setattr(safetensors_file, "safe_open", producer_still_writing)
    problem = only_problem(model)
    assert problem.code == "truncated_file" and "still being written" in problem.message


def test_a_dtype_torch_cannot_hold_is_named_and_the_other_tensors_are_kept(tmp_path):
    (tmp_path / "m").mkdir()
    write_raw_safetensors(tmp_path / "m" / "model.safetensors",
                          {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                           "scale": {"dtype": "F8_E8M0", "shape": [8], "data_offsets": [16, 24]}}, b"\0" * 24)
    folder, problems = ModelFolder.scan(tmp_path / "m")
    assert [(p.code, p.tensor) for p in problems] == [("bad_header", "scale"), ("bad_header", None)]
    assert "unsupported dtype 'F8_E8M0'" in problems[0].message and "8 bytes after" in problems[1].message
    assert folder is not None and list(folder.tensors) == ["w"]


def test_index_names_a_missing_shard(tmp_path, tensors):
    model = write_model(tmp_path / "m", tensors, shard_bytes=1500)
    shards = sorted(model.glob("model-*.safetensors"))
    shards[1].unlink()
    problems = inspect_folder(model).problems
    assert [p.code for p in problems] == ["missing_shard"]
    assert shards[1].name in problems[0].message


def _rewrite_index(model, shard_name: str) -> None:
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard_name
    index_path.write_text(json.dumps(index))


def test_index_path_leaving_the_folder(tmp_path, tensors):
    model = write_model(tmp_path / "m", tensors, shard_bytes=1500)
    _rewrite_index(model, "../evil.safetensors")
    assert "path_escape" in codes(model)


def test_index_absolute_path(tmp_path, tensors):
    model = write_model(tmp_path / "m", tensors, shard_bytes=1500)
    _rewrite_index(model, str(sorted(model.glob("model-*.safetensors"))[0]))
    assert "path_escape" in codes(model)


def test_shard_symlink_escaping_the_folder(tmp_path, tensors):
    model = write_model(tmp_path / "m", tensors)
    (model / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (model / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    problem = only_problem(model)
    assert problem.code == "path_escape" and "outside the model folder" in problem.message


def test_non_finite_values_name_the_tensor(tmp_path, tensors):
    tensors["model.layers.0.mlp.up_proj.weight"][3, 4] = float("nan")
    tensors["model.norm.weight"][0] = float("inf")
    model = write_model(tmp_path / "m", tensors)
    problems = inspect_folder(model).problems
    assert {(p.code, p.tensor) for p in problems} == {
        ("non_finite", "model.layers.0.mlp.up_proj.weight"), ("non_finite", "model.norm.weight")}
    assert any("NaN" in p.message for p in problems) and any("Inf" in p.message for p in problems)


class _Exploit:
    """Unpickling this would create a marker file: proof that pickle was executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_only_folder_is_refused_without_executing_it(tmp_path):
    (tmp_path / "m").mkdir()
    marker = tmp_path / "pwned"
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(pickle.dumps(_Exploit(marker)))
    problem = only_problem(tmp_path / "m")
    assert problem.code == "pickle_weights"
    assert "execute arbitrary code" in problem.message and "safetensors" in problem.message
    assert not marker.exists()


def test_empty_folder(tmp_path):
    (tmp_path / "m").mkdir()
    assert only_problem(tmp_path / "m").code == "empty_folder"


def test_duplicate_tensor_names_across_shards(tmp_path):
    (tmp_path / "m").mkdir()
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    for shard in ("a.safetensors", "b.safetensors"):
        write_raw_safetensors(tmp_path / "m" / shard, header, b"\0" * 8)
    (tmp_path / "m" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "a.safetensors", "x": "b.safetensors"}}))
    assert "duplicate_tensor" in codes(tmp_path / "m")


def test_integer_tensor_where_a_float_is_expected(tmp_path, tensors):
    tensors["model.norm.weight"] = torch.ones(16, dtype=torch.int32)
    tensors["model.position_ids"] = torch.arange(5)  # integer buffers are fine
    problem = only_problem(write_model(tmp_path / "m", tensors))
    assert problem.code == "not_floating" and problem.tensor == "model.norm.weight"


def test_checkpoint_is_compared_with_its_base(tmp_path, tensors):
    base = write_model(tmp_path / "base", tensors, config={"architectures": ["LlamaForCausalLM"]})
    other = random_tensors(seed=1)
    other["model.norm.weight"] = torch.ones(17)
    other["model.extra.weight"] = torch.ones(2)
    del other["model.layers.0.mlp.up_proj.weight"]
    other["model.layers.0.self_attn.q_proj.bias"] = torch.ones(16, dtype=torch.int64)
    checkpoint = write_model(tmp_path / "ck", other, config={"architectures": ["GPT2LMHeadModel"]})
    with ModelFolder.open(base) as b, ModelFolder.open(checkpoint) as c:
        found = {p.code: p for p in problems_against_base(c, b)}
    assert set(found) == {"architecture_mismatch", "missing_tensor", "unexpected_tensor", "shape_mismatch",
                          "not_floating"}
    assert found["shape_mismatch"].tensor == "model.norm.weight"
    assert found["missing_tensor"].tensor == "model.layers.0.mlp.up_proj.weight"


def test_inspect_hashes_match_a_plain_read(tmp_path, tensors):
    import hashlib

    model = write_model(tmp_path / "m", tensors, shard_bytes=1500, config={})
    report = inspect_folder(model)
    for entry in report.files:
        assert entry["sha256"] == hashlib.sha256((model / entry["name"]).read_bytes()).hexdigest()
        assert entry["size"] == (model / entry["name"]).stat().st_size


def test_index_path_through_a_symlinked_directory_leaving_the_folder(tmp_path, tensors):
    model = write_model(tmp_path / "m", tensors, shard_bytes=1500)
    outside = tmp_path / "outside"
    outside.mkdir()
    first = sorted(model.glob("model-*.safetensors"))[0]
    first.rename(outside / first.name)
    (model / "sub").symlink_to(outside)
    _rewrite_index(model, f"sub/{first.name}")
    assert "path_escape" in codes(model)


def test_a_tensor_name_that_is_not_utf8_is_a_problem_not_a_crash(tmp_path, tensors):
    path = write_model(tmp_path / "m", tensors)
    weights = path / "model.safetensors"
    name = next(iter(tensors)).encode()
    weights.write_bytes(weights.read_bytes().replace(name, name[:-1] + b"\xff", 1))
    problem = only_problem(path)
    assert problem.code == "bad_header" and "not UTF-8 text" in problem.message


def test_config_json_must_be_a_json_object_with_a_list_of_architectures(tmp_path, tensors):
    path = write_model(tmp_path / "m", tensors)
    for text, needle in (("{oops", "is not valid JSON"), ("[1, 2]", "is a JSON list, not an object"),
                         (b"{\"a\": \"\xff\"}", "is not UTF-8 text"),
                         ('{"architectures": {"X": 1}}', "'architectures' that is not a list of class names"),
                         ('{"model_type": 3}', "'model_type' that is not a string")):
        config = path / "config.json"
        config.write_bytes(text if isinstance(text, bytes) else text.encode())
        problem = only_problem(path)
        assert problem.code == "bad_config" and needle in problem.message and str(config) in problem.message


def test_a_buffer_the_checkpoint_leaves_out_is_the_bases_and_any_other_missing_tensor_is_a_problem(tmp_path, tensors):
    """Newer transformers no longer save buffers such as BERT's ``position_ids``: a checkpoint without one is read as
    holding the base's; a missing weight is still a rejection naming it."""
    buffers = {"embeddings.position_ids": torch.arange(8), "model.rotary_emb.inv_freq": torch.rand(4)}
    write_model(tmp_path / "base", tensors | buffers)
    write_model(tmp_path / "ck", tensors)
    partial = dict(tensors)
    del partial["model.norm.weight"]
    write_model(tmp_path / "partial", partial | buffers)
    with ModelFolder.open(tmp_path / "base") as base, ModelFolder.open(tmp_path / "ck") as ck, \
            ModelFolder.open(tmp_path / "partial") as cut:
        assert problems_against_base(ck, base) == []
        assert FullFineTune(ck, base).carried == ("embeddings.position_ids", "model.rotary_emb.inv_freq")
        [problem] = problems_against_base(cut, base)
        assert problem.code == "missing_tensor" and "'model.norm.weight'" in problem.message
        assert FullFineTune(cut, base).carried == ()
