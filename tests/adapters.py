"""Builders for adapter tests: tiny transformers bases saved as model folders, real PEFT LoRA adapters of them, and the
full model ``merge_and_unload()`` makes of each adapter (the reference an adapter's fold must equal)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

FAMILIES = ("llama", "bert", "gpt2")
HIDDEN, INTERMEDIATE = 64, 128
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"]
TARGETS = {"llama": (["q_proj", "v_proj", "down_proj"], ["k_proj", "o_proj", "up_proj", "gate_proj"]),
           "bert": (["query", "value"], ["key", "dense"]),
           # GPT-2's Conv1D layers are transposed whatever the config says; lm_head is an nn.Linear
           "gpt2": (["c_attn", "attn.c_proj"], ["mlp.c_proj", "c_fc", "lm_head"])}


def tiny_base(root: Path, family: str) -> Path:
    """A tiny random model of ``family`` saved by the installed transformers, as a stream's base."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "llama":  # grouped-query attention: k and v are 32×64, down 64×128, up 128×64
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=32)
        model = transformers.LlamaForCausalLM(config)
    elif family == "gpt2":  # an untied head, so that it is a tensor of its own
        config = transformers.GPT2Config(vocab_size=64, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=32,
                                         tie_word_embeddings=False)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.BertConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32)
        model = transformers.BertModel(config)
    path = root / f"{family}-base"
    model.save_pretrained(path)
    return path


def load(base: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.from_pretrained(base)
    auto = transformers.AutoModelForCausalLM if config.model_type in ("llama", "gpt2") else transformers.AutoModel
    return auto.from_pretrained(base)


def make_adapter(base: Path, path: Path, *, seed: int, rank: int = 4, alpha: float = 8, targets: list[str],
                 rslora: bool = False, scale: float = 0.08, **settings: Any) -> Path:
    """A LoRA adapter of ``base`` made and saved by peft, its factors random (``scale``) so that its update is not
    zero, yet within what a fine-tune changes (‖τ‖/‖θ0‖ ≈ 0.1-0.3 on the tiny bases here: a stream's first update
    must stay within max_base_relative_update)."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(load(base), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    model.save_pretrained(path)
    return path


def merged_by_peft(base: Path, adapter: Path, path: Path) -> Path:
    """The full model peft's ``merge_and_unload()`` makes of ``adapter`` on ``base``, saved by transformers."""
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(load(base), adapter).merge_and_unload()
    model.save_pretrained(path)
    return path


def adapter_and_merged(base: Path, out: Path, *, seed: int, rank: int, targets: list[str], rslora: bool = False
                       ) -> tuple[Path, Path]:
    """An adapter of ``base`` with small factors (as trained ones are, against the weights) and peft's full model of
    it, as ``out/adapter`` and ``out/full``."""
    adapter = make_adapter(base, out / "adapter", seed=seed, rank=rank, alpha=2 * rank + 1, targets=targets,
                           rslora=rslora, scale=0.05)
    return adapter, merged_by_peft(base, adapter, out / "full")
