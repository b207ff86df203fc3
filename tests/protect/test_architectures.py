"""Every supported architecture, built by transformers: protected outputs equal the original's, the attention
weights move far, only attention tensors change, and unprotect gives the original weights back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergeops.protect import protect, unprotect
from mergeops.protect.architectures import FAMILIES
from tests.protect.conftest import ARCHITECTURES, KEY, inputs_for, max_rel_error, outputs, rel_change

# Names of the projections MergeLock may touch, across all families (weights, and q/k/v biases).
ATTENTION = ("query", "key", "value", "attention.output.dense.weight", "q_proj", "k_proj", "v_proj", "o_proj.weight",
             "out_proj.weight", "c_attn", "attn.c_proj.weight")


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_protected_model_computes_the_same_function_and_unprotect_restores_it(name, model_dir, tmp_path):
    source = model_dir(name)
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
    assert all(any(a in k for a in ATTENTION) for k in changed), changed  # nothing outside attention moves
    for k in changed:
        if k.endswith("weight"):
            assert rel_change(after[k], before[k]) >= 0.3, k
    assert report["movement"]["passed"] and report["movement"]["min"] >= 0.3

    if name.startswith("qwen3"):  # per-head q/k RMSNorm: only V/O is protected, and the report says so
        assert not any("q_proj" in k or "k_proj" in k for k in changed)
        assert report["branches"] == ["vo"] and "q/k normalisation" in report["notes"][0]
    else:
        assert report["branches"] == ["qk", "vo"]

    unprotect(locked, restored, KEY)
    back = load_file(restored / "model.safetensors")
    for k, tensor in before.items():
        if k in changed:
            assert rel_change(back[k], tensor) <= 1e-6, k
        else:
            assert torch.equal(back[k], tensor), k
    with safe_open(restored / "model.safetensors", "pt") as f:
        assert not any(k.startswith("mergelock.") for k in f.metadata())


def test_the_table_covers_the_required_families_and_nothing_is_hardcoded_elsewhere():
    labels = {f.label for f in FAMILIES}
    assert {"BERT", "RoBERTa", "ViT", "CLIP", "GPT-2", "Llama", "Mistral", "Qwen2"} <= labels
    rotary = {f.label for f in FAMILIES if f.rotary}
    assert rotary == {"Llama", "Mistral", "Qwen2", "Qwen3"}
    assert all(f.rotary == "half" for f in FAMILIES if f.rotary)  # HF layout: i pairs with i + d/2


def test_sharded_checkpoint_with_task_head_prefix(model_dir, tmp_path):
    source = model_dir("llama-gqa", max_shard_size="40KB")
    assert (source / "model.safetensors.index.json").is_file()
    report = protect(source, tmp_path / "locked", KEY, verify=True)
    assert report["layers"] == 2 and report["kv_heads"] == 2 and report["heads"] == 4
    assert report["function_check"]["forward"]["max_relative_error"] <= 1e-5
