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

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(latest)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 256) and bool(torch.isfinite(logits).all())
