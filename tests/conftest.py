"""Shared test helpers: real model folders on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergeops.model import ModelWriter, TensorSpec


def write_model(path: Path, tensors: dict[str, torch.Tensor], *, shard_bytes: int | None = None,
                config: dict | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` as a model folder (optionally sharded) with an optional config.json."""
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    kwargs = {"shard_bytes": shard_bytes} if shard_bytes else {}
    with ModelWriter(path, specs, metadata=metadata, **kwargs) as writer:
        if config is not None:
            writer.extra_files["config.json"] = json.dumps(config).encode()
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    return path


def random_tensors(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(50, 16, generator=g).to(dtype),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g).to(dtype),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(16, generator=g).to(dtype),
        "model.layers.0.mlp.up_proj.weight": torch.randn(24, 16, generator=g).to(dtype),
        "model.norm.weight": torch.randn(16, generator=g).to(dtype),
    }


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    return random_tensors()
