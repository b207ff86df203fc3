"""Fine-tune MiniLM's encoder on one task against its frozen class-mean head, and save checkpoints that
``mergeops`` can fold: a model folder with exactly the base's tensor names, shapes and dtypes (written with
mergeops' own ``ModelWriter``, config and tokenizer carried from the base), ``exp_avg_sq.safetensors`` (AdamW's
second moments, float32, same names; for OTA) and ``trainer_state.json`` (``global_step`` and a ``log_history``
of training losses, as the Hugging Face Trainer writes it; for MWA).

Everything trainable is trained except the pooler (``pooler.dense``): mean pooling never uses it, so it gets no
gradient and AdamW keeps no state for it. It is frozen, its task vector is exactly zero, and its
``exp_avg_sq`` is written as zeros (the true second moment of a parameter that never had a gradient); every such
tensor is listed in the manifest under ``zero_curvature``. A trainable parameter without AdamW state is an error.

Results are cached: one folder per (task data, training config, save steps, base model digest).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from benchmarks.quality.encoder import LOGIT_SCALE, class_mean_head, embed, load_encoder, load_tokenizer, logits
from benchmarks.quality.encoder import Batch as EncodedBatch
from mergeops.model import ModelFolder, ModelWriter, TensorSpec
from mergeops.model.writer import write_tensor_file

CACHE_VERSION = 1  # bump when the meaning of a cached fine-tune changes
FROZEN_PREFIXES = ("pooler.",)  # unused by mean pooling: no gradient, no optimizer state
CURVATURE_FILE = "exp_avg_sq.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 32
    lr: float = 5e-5
    warmup: float = 0.1  # share of steps with linear warm-up; then linear decay to 0
    weight_decay: float = 0.0
    max_length: int = 32
    log_every: int = 10
    seed: int = 0


@dataclass(frozen=True)
class FineTune:
    task: str
    entry: Path  # the cache folder
    head: torch.Tensor  # [classes, hidden], frozen
    checkpoints: tuple[Path, ...]  # in step order; the last one is the fine-tune
    manifest: dict[str, Any]
    cached: bool  # False when it was trained by this call

    @property
    def final(self) -> Path:
        return self.checkpoints[-1]


def cache_key(task_fingerprint: str, config: TrainConfig, save_at: tuple[int, ...], base_digest: str) -> str:
    document = {"version": CACHE_VERSION, "task": task_fingerprint, "config": dataclasses.asdict(config),
                "save_at": save_at, "base": base_digest, "logit_scale": LOGIT_SCALE}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]


def finetune(task: Any, config: TrainConfig, save_at: tuple[int, ...], base: Path, base_digest: str,
             cache: Path, log: Any = print) -> FineTune:
    """The cached fine-tune of ``task`` (trained now if absent), with checkpoints at the ``save_at`` steps."""
    if not save_at or max(save_at) != config.steps or min(save_at) < 1:
        raise ValueError(f"save_at must be steps in 1..{config.steps} ending with {config.steps}, not {save_at}")
    entry = cache / f"{task.name}-{cache_key(task.fingerprint(), config, save_at, base_digest)}"
    cached = (entry / "manifest.json").is_file()
    if not cached:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".tmp-{entry.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        log(f"fine-tuning {task.name}: {config.steps} steps -> {entry}")
        _train(task, config, sorted(set(save_at)), base, tmp)
        tmp.rename(entry)
    else:
        log(f"fine-tune of {task.name}: cached at {entry}")
    manifest = json.loads((entry / "manifest.json").read_text())
    head = load_file(entry / "head.safetensors")["head"]
    return FineTune(task.name, entry, head, tuple(entry / c["path"] for c in manifest["checkpoints"]), manifest,
                    cached)


def _collate(ids: list[list[int]], pad: int) -> EncodedBatch:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, :len(x)] = torch.tensor(x)
        mask[row, :len(x)] = 1
    return EncodedBatch(input_ids, mask)


def _schedule(config: TrainConfig) -> Any:
    warm = max(1, round(config.warmup * config.steps))

    def factor(step: int) -> float:
        return (step + 1) / warm if step < warm else max(0.0, (config.steps - step) / (config.steps - warm))

    return factor


def _train(task: Any, config: TrainConfig, save_at: list[int], base: Path, out: Path) -> None:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(base)
    model = load_encoder(base)
    head = class_mean_head(model, tokenizer, task, config.max_length)
    save_file({"head": head.contiguous()}, out / "head.safetensors")
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(FROZEN_PREFIXES))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    ids = tokenizer([t for t, _ in task.train], truncation=True, max_length=config.max_length)["input_ids"]
    labels = torch.tensor([y for _, y in task.train])
    order = torch.Generator().manual_seed(config.seed)
    queue: list[int] = []
    window: list[float] = []
    history: list[dict[str, float]] = []
    checkpoints = []
    model.train()
    for step in range(1, config.steps + 1):
        if len(queue) < config.batch_size:
            queue += torch.randperm(len(ids), generator=order).tolist()
        picked, queue = queue[:config.batch_size], queue[config.batch_size:]
        batch = _collate([ids[i] for i in picked], tokenizer.pad_token_id)
        loss = F.cross_entropy(logits(embed(model, batch), head), labels[picked])
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.item())
        if step % config.log_every == 0 or step == config.steps:
            history.append({"epoch": round(step * config.batch_size / len(ids), 4), "learning_rate":
                            scheduler.get_last_lr()[0], "loss": sum(window) / len(window), "step": step})
            window = []
        if step in save_at:
            path = f"checkpoints/step-{step:06d}"
            state = {"global_step": step, "max_steps": config.steps, "log_history": list(history)}
            zero = save_checkpoint(model, optimizer, base, out / path, state)
            checkpoints.append({"step": step, "path": path, "loss": history[-1]["loss"]})
    manifest = {"task": task.name, "fingerprint": task.fingerprint(), "config": dataclasses.asdict(config),
                "logit_scale": LOGIT_SCALE, "train_examples": len(ids), "checkpoints": checkpoints,
                "zero_curvature": zero, "frozen": list(FROZEN_PREFIXES),
                "train_seconds": round(time.perf_counter() - started, 1), "log_history": history,
                "torch_threads": torch.get_num_threads()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def save_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, base: Path, out: Path,
                    trainer_state: dict[str, Any]) -> list[str]:
    """Write the encoder as a model folder shaped exactly like ``base``, plus exp_avg_sq and trainer_state.json.

    Returns the names of tensors whose exp_avg_sq was written as zeros (frozen parameters)."""
    weights = model.state_dict()
    params = dict(model.named_parameters())
    zero: list[str] = []
    with ModelFolder.open(base) as folder:
        specs = [TensorSpec(name, info.dtype, info.shape) for name, info in folder.tensors.items()]
        writer = ModelWriter(out, specs, metadata={"benchmark": "mergeops quality"}, donor=base)
        writer.extra_files["trainer_state.json"] = (json.dumps(trainer_state, indent=1) + "\n").encode()
        with writer:
            for name in writer.layout_order:
                info = folder.tensors[name]
                # integer buffers (position ids) are not in the state dict and must equal the base's
                tensor = weights[name] if info.dtype.is_floating_point else folder.read(name)
                writer.write(name, tensor.detach().to(info.dtype).contiguous())

        def second_moment(spec: TensorSpec) -> torch.Tensor:
            param = params.get(spec.name)
            if param is None:
                raise KeyError(f"{spec.name} is in the model folder but not a parameter of the encoder")
            state = optimizer.state.get(param, {})
            if "exp_avg_sq" in state:
                return state["exp_avg_sq"].detach().float().contiguous()
            if param.requires_grad:
                raise RuntimeError(f"trainable parameter {spec.name} has no AdamW state (it never got a gradient)")
            zero.append(spec.name)
            return torch.zeros(spec.shape, dtype=torch.float32)

        floating = [TensorSpec(s.name, torch.float32, s.shape) for s in specs if s.dtype.is_floating_point]
        write_tensor_file(out / CURVATURE_FILE, floating, second_moment)
    return zero


def steps_to_save(config: TrainConfig, checkpoints: int) -> tuple[int, ...]:
    """``checkpoints`` evenly spaced steps ending at the last one (1 = the final checkpoint only)."""
    return tuple(math.ceil(config.steps * (i + 1) / checkpoints) for i in range(checkpoints))
