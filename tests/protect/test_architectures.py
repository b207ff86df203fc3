"""Every supported architecture, built by transformers: the protected model computes the same function (float32,
and bf16/fp16 storage within the original's own rounding), unprotect gives every original byte back, the same
key and input give the same bytes, and a merge with the protected model is far from the ordinary merge."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergeops.errors import UsageError
from mergeops.model import folder_digest
from mergeops.model.architectures import FAMILIES
from mergeops.protect import protect, unprotect
from tests.protect.conftest import (
    ARCHITECTURES,
    KEY,
    build_model,
    copy_with_weights,
    inputs_for,
    max_rel_error,
    outputs,
    rel_change,
    save,
)

# Names of the projections MergeLock may touch, across all families (attention and MLP weights and biases).
LAYER_PARTS = ("query", "key", "value", "attention.output.dense.weight", "q_proj", "k_proj", "v_proj", "o_proj.weight",
               "out_proj.weight", "c_attn", "attn.c_proj.weight", "intermediate.dense", "output.dense.weight",
               "fc1", "fc2.weight", "c_fc", "mlp.c_proj.weight", "up_proj", "gate_proj", "down_proj")


def files_of(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_same_function_exact_restore_and_same_bytes_every_time(name, model_dir, tmp_path):
    source = model_dir(name)
    (source / "README.md").write_text("---\nlicense: apache-2.0\n---\n# the original card\n")
    locked, restored = tmp_path / "locked", tmp_path / "restored"
    model_cls = ARCHITECTURES[name][1]

    report = protect(source, locked, KEY, verify=True)

    inputs = inputs_for(name)
    error = max_rel_error(outputs(model_cls, source, inputs), outputs(model_cls, locked, inputs))
    assert error <= 1e-5, f"{name}: protected outputs differ by {error:.2e}"
    assert report["function_check"]["forward"]["passed"] and report["function_check"]["invariants"]["passed"]
    json.dumps(report)  # the --json document

    before, after = load_file(source / "model.safetensors"), load_file(locked / "model.safetensors")
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert len(changed) == report["tensors_changed"] > 0
    assert all(any(p in k for p in LAYER_PARTS) for k in changed), changed  # nothing outside the layers moves
    assert any(p in k for k in changed for p in ("intermediate", "fc1", "c_fc", "up_proj"))  # the MLP too
    for k in changed:
        if k.endswith("weight"):
            assert rel_change(after[k], before[k]) >= 0.3, k
    if name.startswith("qwen3"):  # per-head q/k RMSNorm: queries and keys are left alone, and the report says so
        assert not any("q_proj" in k or "k_proj" in k for k in changed)
        assert "q/k normalisation" in report["notes"][0]
        assert not any(p.startswith("attention query/key") for p in report["transformed"])

    unprotect(locked, restored, KEY)
    assert files_of(restored) == files_of(source)  # every file, byte for byte: weights, config, card
    assert folder_digest(restored) == folder_digest(source)

    protect(source, tmp_path / "again", KEY)  # the salt is derived from key and input: the same bytes
    assert files_of(tmp_path / "again") == files_of(locked)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_half_precision_storage_stays_within_its_own_rounding_and_restores_exactly(name, tmp_path):
    model_cls = ARCHITECTURES[name][1]
    model = build_model(name)
    exact = save(model, tmp_path / "f32")
    inputs = inputs_for(name)
    reference = outputs(model_cls, exact, inputs)
    for dtype, strength in ((torch.bfloat16, None), (torch.float16, 0)):
        stored = save(build_model(name), tmp_path / str(dtype), dtype)
        kwargs = {} if strength is None else {"strength": strength}
        protect(stored, tmp_path / f"{dtype}-locked", KEY, **kwargs)
        own = max_rel_error(reference, outputs(model_cls, stored, inputs))  # what storing in this dtype costs
        locked = max_rel_error(reference, outputs(model_cls, tmp_path / f"{dtype}-locked", inputs))
        assert locked <= own * 1.01 + 1e-6, (dtype, locked, own)
        unprotect(tmp_path / f"{dtype}-locked", tmp_path / f"{dtype}-back", KEY)
        assert files_of(tmp_path / f"{dtype}-back") == files_of(stored)


def test_float16_weights_that_cannot_hold_the_scaling_are_refused_and_nothing_is_written(model_dir, tmp_path):
    source = model_dir("bert", dtype=torch.float16)  # random init: many weights near zero, subnormal when halved
    with pytest.raises(UsageError, match=r"float16\) cannot hold MergeLock's scaling.*--strength 0"):
        protect(source, tmp_path / "locked", KEY, strength=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert-0"]


def hidden_states(model_cls: str, path, inputs) -> torch.Tensor:
    found = outputs(model_cls, path, inputs)
    key = next(k for k in ("last_hidden_state", "logits", "text_model_output.last_hidden_state") if k in found)
    return found[key]


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_merging_with_a_protected_model_is_far_from_the_ordinary_merge(name, tmp_path):
    model_cls = ARCHITECTURES[name][1]
    # Two "fine-tunes" of one base: the base plus 1% relative noise each, as fine-tunes sit close to their base.
    a = save(build_model(name, init=0.2), tmp_path / "base")
    state = load_file(a / "model.safetensors")  # the names as saved (they may differ from the state dict's)
    tuned = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        tuned.append({k: v + 0.01 * v.abs().mean() * torch.randn(v.shape, generator=g) if v.is_floating_point()
                      else v for k, v in state.items()})
    first = copy_with_weights(a, tmp_path / "ft-1", tuned[0])
    second = copy_with_weights(a, tmp_path / "ft-2", tuned[1])
    protect(first, tmp_path / "ft-1-locked", KEY)
    locked = load_file(tmp_path / "ft-1-locked" / "model.safetensors")

    def average(x: dict, y: dict) -> dict:
        return {k: (x[k] + y[k]) / 2 if x[k].is_floating_point() else x[k] for k in x}

    plain = copy_with_weights(a, tmp_path / "plain", average(tuned[0], tuned[1]))
    broken = copy_with_weights(a, tmp_path / "broken", average(locked, tuned[1]))
    inputs = inputs_for(name)
    reference = hidden_states(model_cls, second, inputs)
    moved_plain = float((hidden_states(model_cls, plain, inputs) - reference).norm() / reference.norm())
    merged = hidden_states(model_cls, plain, inputs)
    moved_locked = float((hidden_states(model_cls, broken, inputs) - merged).norm() / merged.norm())
    assert moved_locked >= 0.5 and moved_locked >= 10 * moved_plain, (moved_locked, moved_plain)


def test_the_table_covers_the_required_families_and_nothing_is_hardcoded_elsewhere():
    labels = {f.label for f in FAMILIES}
    assert {"BERT", "RoBERTa", "ViT", "CLIP", "GPT-2", "Llama", "Mistral", "Qwen2"} <= labels
    rotary = {f.label for f in FAMILIES if f.rotary}
    assert rotary == {"Llama", "Mistral", "Qwen2", "Qwen3"}
    assert all(f.rotary == "half" for f in FAMILIES if f.rotary)  # HF layout: i pairs with i + d/2
    assert {f.label for f in FAMILIES if f.gate} == rotary  # SwiGLU MLPs


def test_sharded_checkpoint_keeps_its_layout_and_restores_byte_for_byte(model_dir, tmp_path):
    source = model_dir("llama-gqa", max_shard_size="40KB")
    assert (source / "model.safetensors.index.json").is_file()
    report = protect(source, tmp_path / "locked", KEY, verify=True)
    assert report["layers"] == 2 and report["kv_heads"] == 2 and report["heads"] == 4
    assert report["function_check"]["forward"]["max_relative_error"] <= 1e-5
    shards = sorted(p.name for p in source.glob("*.safetensors"))
    assert sorted(p.name for p in (tmp_path / "locked").glob("*.safetensors")) == shards
    for shard in shards:
        with safe_open(tmp_path / "locked" / shard, "pt") as f:
            assert f.metadata()["mergelock.scheme"] == "mergelock-v2"
    unprotect(tmp_path / "locked", tmp_path / "back", KEY)
    assert files_of(tmp_path / "back") == files_of(source)
