"""Real LoRA adapters for tests: made with peft on tiny transformers models saved as base folders, B randomised so
the updates are not zero, each with the same update merged into a full model by peft (``merge_and_unload``)."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import torch
import transformers

HIDDEN, INTERMEDIATE = 64, 128
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"]


def tiny_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":  # grouped-query attention: k and v are 32×64, down 64×128, up 128×64
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=INTERMEDIATE, max_position_embeddings=32, bos_token_id=1, eos_token_id=2,
            pad_token_id=0))
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=INTERMEDIATE,
        max_position_embeddings=32))


def make_base(root: Path, kind: str) -> Path:
    tiny_model(kind).save_pretrained(root / "base")
    return root / "base"


def make_adapter(base: Path, out: Path, *, seed: int, rank: int, targets: list[str], rslora: bool = False
                 ) -> tuple[Path, Path]:
    """A LoRA adapter of ``base`` with random (non-zero) B, and the same update merged into a full model by peft."""
    cls = transformers.LlamaForCausalLM if "llama" in json.loads((base / "config.json").read_text())["model_type"] \
        else transformers.BertModel
    model = peft.get_peft_model(cls.from_pretrained(base), peft.LoraConfig(
        r=rank, lora_alpha=2 * rank + 1, target_modules=targets, use_rslora=rslora, lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save_pretrained(out / "adapter")
    config_path = out / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"base_model_name_or_path": str(base)}))
    model.merge_and_unload().save_pretrained(out / "full")
    return out / "adapter", out / "full"
