"""The README's demo runs the daemon end to end, and its merged model loads in transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from mergeops.demo import run_demo

DEMO_POLICY = Path(__file__).parent.parent / "policies" / "demo.toml"


def test_demo_folds_every_checkpoint_into_a_model_transformers_can_run(tmp_path):
    (tmp_path / "policies").mkdir()
    policy = shutil.copy(DEMO_POLICY, tmp_path / "policies" / "demo.toml")
    lines = list(run_demo(Path(policy), checkpoints=3))
    assert [line for line in lines if line.startswith("  -> ")] == [f"  -> demo version {i} (opcm)" for i in (1, 2, 3)]
    assert "daemon: stopped with SIGTERM (exit 0)" in lines and lines[-1] == "audit: intact"
    assert "dropped adapter-003 (a LoRA adapter) into the registry" in lines
    assert any(line.startswith("  v0003 <- ") and "adapter-003" in line and "LoRA adapter r=8" in line
               for line in lines)
    latest = tmp_path / "demo-run" / "merged" / "demo" / "latest"
    assert latest.resolve().name == "v0003"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(latest)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 256) and bool(torch.isfinite(logits).all())
    versions = sorted(latest.parent.glob("v0*"))
    assert [v.name for v in versions] == ["v0001", "v0002", "v0003"]
    for version in versions:  # every version carries the base's small real tokenizer, sized as the model
        tokenizer = AutoTokenizer.from_pretrained(version)
        assert len(tokenizer) == model.config.vocab_size and tokenizer.eos_token_id == model.config.eos_token_id
        ids = tokenizer("w0 W7 unknown </s>", return_tensors="pt").input_ids
        assert ids.tolist() == [[4, 11, tokenizer.unk_token_id, tokenizer.eos_token_id]]
        assert bool(torch.isfinite(model(ids).logits).all())
