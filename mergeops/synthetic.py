"""Small generated models for the demo, the tests and the benchmarks.

A Llama-shaped base with random weights, and "fine-tunes" of it: the base plus a low-rank update on
every linear layer and small noise elsewhere, the way real fine-tunes differ from their base; or LoRA
adapters of it, in PEFT's format. Written one tensor at a time, so a 1B-parameter model needs no more
memory than its largest tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeops.model import ModelFolder, ModelWriter, TensorSpec
from mergeops.model.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX
from mergeops.model.writer import write_tensor_file


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 64
    layers: int = 2
    intermediate: int = 172
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 256

    def config(self) -> dict[str, object]:
        """A config.json that transformers can instantiate (LlamaForCausalLM)."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "float32",
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
        }

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, self.hidden)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes |= {
                p + "input_layernorm.weight": (self.hidden,),
                p + "self_attn.q_proj.weight": (self.hidden, self.hidden),
                p + "self_attn.k_proj.weight": (kv, self.hidden),
                p + "self_attn.v_proj.weight": (kv, self.hidden),
                p + "self_attn.o_proj.weight": (self.hidden, self.hidden),
                p + "post_attention_layernorm.weight": (self.hidden,),
                p + "mlp.gate_proj.weight": (self.intermediate, self.hidden),
                p + "mlp.up_proj.weight": (self.intermediate, self.hidden),
                p + "mlp.down_proj.weight": (self.hidden, self.intermediate),
            }
        shapes |= {"model.norm.weight": (self.hidden,), "lm_head.weight": (self.vocab, self.hidden)}
        return shapes

    @property
    def parameters(self) -> int:
        total = 0
        for shape in self.tensor_shapes().values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def tokenizer_files(vocab_size: int) -> dict[str, bytes]:
    """A small real tokenizer with ``vocab_size`` tokens, as ``tokenizer.json`` and ``tokenizer_config.json``: a
    word-level model over whitespace-split words (the special tokens, then ``w0``, ``w1``, ...), which
    ``transformers.AutoTokenizer`` loads without the Hub."""
    words = list(SPECIAL_TOKENS.values()) + [f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS))]
    added = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, token in enumerate(SPECIAL_TOKENS.values())]
    document = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "WhitespaceSplit"},
                "post_processor": None, "decoder": None,
                "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(words)},
                          "unk_token": SPECIAL_TOKENS["unk_token"]}}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512, **SPECIAL_TOKENS}
    return {"tokenizer.json": (json.dumps(document, indent=2) + "\n").encode(),
            "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode()}


def llama_shape_for(parameters: int) -> LlamaShape:
    """A Llama-like shape with roughly ``parameters`` parameters (for benchmarks)."""
    for hidden, layers in ((512, 4), (768, 12), (1024, 16), (1536, 20), (2048, 22), (2560, 26), (3072, 28)):
        shape = LlamaShape(hidden=hidden, layers=layers, intermediate=int(hidden * 2.6875) // 64 * 64,
                           heads=hidden // 64, kv_heads=max(1, hidden // 256), vocab=32000)
        if shape.parameters >= parameters * 0.9:
            return shape
    return shape


def write_base(out: Path, shape: LlamaShape, *, seed: int = 0, dtype: torch.dtype = torch.float32,
               shard_bytes: int | None = None) -> Path:
    """A random base model folder with a real Llama config.json and a small real tokenizer."""
    generator = torch.Generator().manual_seed(seed)
    shapes = shape.tensor_shapes()
    specs = [TensorSpec(name, dtype, s) for name, s in shapes.items()]
    kwargs = {"shard_bytes": shard_bytes} if shard_bytes else {}
    config = dict(shape.config(), torch_dtype=str(dtype).removeprefix("torch."))
    with ModelWriter(out, specs, **kwargs) as writer:
        writer.extra_files["config.json"] = (json.dumps(config, indent=2) + "\n").encode()
        writer.extra_files.update(tokenizer_files(shape.vocab))
        for name, s in shapes.items():
            if len(s) == 1:
                tensor = torch.ones(s)
            else:
                tensor = torch.randn(s, generator=generator) * (1.0 / s[-1] ** 0.5)
            writer.write(name, tensor.to(dtype))
    return out


def write_finetune(base: Path, out: Path, *, seed: int, scale: float = 0.02, rank: int = 4,
                   shard_bytes: int | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """A fine-tune of ``base``: a rank-``rank`` update on every 2-D tensor plus small dense noise,
    ``scale`` relative to each tensor's typical magnitude. Config and tokenizer come from the base."""
    generator = torch.Generator().manual_seed(seed)
    with ModelFolder.open(base) as model:
        specs = [TensorSpec(n, i.dtype, i.shape) for n, i in model.tensors.items()]
        kwargs = {"shard_bytes": shard_bytes} if shard_bytes else {}
        with ModelWriter(out, specs, donor=base, **kwargs) as writer:
            if extra_files:
                writer.extra_files.update({k: v.encode() for k, v in extra_files.items()})
            for name, tensor in model.iter_tensors():
                writer.write(name, _perturb(tensor, generator, scale, rank))
    return out


ATTENTION_AND_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(base: Path, out: Path, *, seed: int, rank: int = 8, alpha: float = 16,
                  targets: tuple[str, ...] = ATTENTION_AND_MLP, scale: float = 0.02) -> Path:
    """A PEFT LoRA adapter of ``base`` (``adapter_config.json`` and ``adapter_model.safetensors``, as
    ``save_pretrained`` writes them) on the 2-D weights of modules named ``targets``: its update ΔW = alpha/r · B·A is
    about ``scale`` of each weight's typical magnitude."""
    generator = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    factors: dict[str, torch.Tensor] = {}
    with ModelFolder.open(base) as model:
        for name, info in model.tensors.items():
            module = name.removesuffix(".weight")
            if len(info.shape) != 2 or module.rsplit(".", 1)[-1] not in targets:
                continue
            rows, columns = info.shape
            magnitude = float(model.read(name).float().abs().mean()) or 1.0
            factors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = torch.randn(rank, columns, generator=generator)
            factors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = torch.randn(rows, rank, generator=generator) * (
                scale * magnitude * rank / alpha / rank ** 0.5)
    specs = [TensorSpec(n, torch.float32, tuple(t.shape)) for n, t in factors.items()]
    write_tensor_file(out / ADAPTER_WEIGHTS, specs, lambda spec: factors[spec.name])
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(Path(base).resolve()),
              "r": rank, "lora_alpha": alpha, "target_modules": sorted(targets), "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "inference_mode": True}
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def _perturb(tensor: torch.Tensor, generator: torch.Generator, scale: float, rank: int) -> torch.Tensor:
    if not tensor.dtype.is_floating_point:
        return tensor
    t = tensor.float()
    magnitude = float(t.abs().mean()) or 1.0
    delta = torch.randn(t.shape, generator=generator) * (0.1 * scale * magnitude)
    if t.dim() == 2:
        m, n = t.shape
        r = min(rank, m, n)
        u = torch.randn(m, r, generator=generator)
        v = torch.randn(r, n, generator=generator)
        delta += (u @ v) * (scale * magnitude / r ** 0.5)
    return (t + delta).to(tensor.dtype)



def write_curvature(checkpoint: Path, *, seed: int) -> Path:
    """A plausible ``exp_avg_sq.safetensors`` (positive, heavy-tailed, ~1e-10..1e-6) for OTA."""
    generator = torch.Generator().manual_seed(seed)
    with ModelFolder.open(checkpoint) as model:
        specs = [TensorSpec(n, torch.float32, i.shape) for n, i in model.tensors.items() if i.dtype.is_floating_point]
    return write_tensor_file(checkpoint / "exp_avg_sq.safetensors", specs,
                             lambda spec: torch.rand(spec.shape, generator=generator).pow_(4).mul_(1e-6).add_(1e-10))
