"""Builders for fold tests: a random base, random checkpoints of it, a policy, and reading results."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mergeops.keys import generate_keys
from mergeops.model import ModelFolder
from tests.conftest import random_tensors, write_model

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def make_base(root: Path, dtype: torch.dtype = torch.float32, shard_bytes: int | None = None) -> tuple[Path, dict]:
    tensors = random_tensors(seed=0, dtype=dtype) | {"model.position_ids": torch.arange(8)}
    return write_model(root / "base", tensors, shard_bytes=shard_bytes, config=CONFIG), tensors


def make_checkpoints(root: Path, base: dict[str, torch.Tensor], count: int, *, shard_bytes: int | None = None,
                     curvature: bool = False, metrics: bool = False, seed: int = 100) -> list[Path]:
    """``count`` fine-tunes: base + a task vector of varying scale; optional exp_avg_sq and metrics.json."""
    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(seed + i)
        tensors = {}
        for name, t in base.items():
            if t.dtype.is_floating_point:
                delta = torch.randn(t.shape, generator=g) * (0.05 * (i + 1))
                if t.dim() == 2:  # a low-rank component, as real fine-tunes have
                    delta += torch.randn(t.shape[0], 2, generator=g) @ torch.randn(2, t.shape[1], generator=g) * 0.1
                tensors[name] = (t.float() + delta).to(t.dtype)
            else:
                tensors[name] = t.clone()
        path = write_model(root / f"ck{i}", tensors, shard_bytes=shard_bytes, config=CONFIG)
        if curvature:
            v = {n: (torch.rand(t.shape, generator=g) ** 3) * 1e-6
                 for n, t in tensors.items() if t.dtype.is_floating_point}
            write_model(root / f"v{i}", v)
            (root / f"v{i}" / "model.safetensors").rename(path / "exp_avg_sq.safetensors")
        if metrics:
            (path / "metrics.json").write_text(json.dumps({"loss": 0.5 + 0.37 * i, "step": 100 * (i + 1)}))
        paths.append(path)
    return paths


def write_policy(root: Path, base: Path, method: str, params: dict | None = None, dtype: str = "base",
                 keep: int = 5, vocab: str = "reject") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "keys").exists():
        generate_keys(root / "keys")
    lines = ['home = "state"', "[keys]", 'signing = "keys/signing.pem"', "[streams.s]", f'base = "{base}"',
             f'method = "{method}"', 'output = "out"', f"keep = {keep}", f'dtype = "{dtype}"', f'vocab = "{vocab}"',
             "[streams.s.params]"]
    for key, value in (params or {}).items():
        lines.append(f"{key} = {json.dumps(value)}")
    path = root / "policy.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def read_model(path: Path) -> dict[str, torch.Tensor]:
    with ModelFolder.open(path) as model:
        return dict(model.iter_tensors())


def read_floats(path: Path) -> dict[str, torch.Tensor]:
    return {n: t.double() for n, t in read_model(path).items() if t.dtype.is_floating_point}


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = 2e-5) -> None:
    """Relative error per tensor, against the tensor's scale, below ``rtol``."""
    assert set(actual) == set(expected)
    for name in expected:
        a, e = actual[name].double(), expected[name].double()
        scale = e.abs().max().clamp_min(1e-12)
        error = float((a - e).abs().max() / scale)
        assert error < rtol, f"{name}: relative error {error:.2e}"
