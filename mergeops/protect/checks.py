"""What ``protect`` measures on the model it protects: how far the weights moved, whether the function is
unchanged, and how much of the protection an anchor attack undoes (SPEC §8, "Honesty").

All of it is computed per layer while the layer is in memory (streaming), in float64, from the weights as
they were actually written.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergeops.model.architectures import tower_config
from mergeops.protect.architectures import LayerUnit, Plan
from mergeops.protect.layer import F64, LayerWeights
from mergeops.protect.transforms import rotary_pairs

MIN_MOVEMENT = 0.3  # ‖W' − W‖/‖W‖ every transformed tensor must reach
PROBES = 8  # random inputs per layer for the per-head invariants
FLOAT32_TOLERANCE = 1e-5  # SPEC §9: protected float32 outputs equal the original's to this relative error
BRANCHES = {"qk": ("q", "k"), "vo": ("v", "o"), "mlp": ("up", "gate", "down")}


def tolerance(dtype: torch.dtype) -> float:
    """Allowed relative error of the per-layer invariants after protection.

    The transforms are exact (signed permutations and powers of two), so what is left is the rounding of the
    float64 arithmetic of the check itself and of sums taken in another order: 1e-5 whatever the storage dtype
    (SPEC §9's float32 bar)."""
    return FLOAT32_TOLERANCE


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(new - old) / torch.linalg.vector_norm(old).clamp_min(1e-30))


@dataclass
class Measurements:
    movement: dict[str, list[float]] = field(default_factory=lambda: {b: [] for b in BRANCHES})
    invariant: dict[str, float] = field(default_factory=lambda: {b: 0.0 for b in BRANCHES})

    def add(self, unit: LayerUnit, orig: LayerWeights, prot: LayerWeights, head_order: torch.Tensor) -> None:
        for branch, roles in BRANCHES.items():
            if branch == "qk" and not unit.qk:
                continue
            self.movement[branch] += [relative_change(prot.role(r), orig.role(r))  # type: ignore[arg-type]
                                      for r in roles if orig.role(r) is not None]
        for branch, error in invariant_errors(unit, orig, prot, head_order).items():
            self.invariant[branch] = max(self.invariant[branch], error)

    def movement_report(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for branch, values in self.movement.items():
            if values:
                out[branch] = {"min": round(min(values), 4), "mean": round(sum(values) / len(values), 4),
                               "tensors": len(values)}
        every = [v for values in self.movement.values() for v in values]
        out["min"] = round(min(every), 4) if every else 0.0
        out["required"] = MIN_MOVEMENT
        out["passed"] = bool(every) and min(every) >= MIN_MOVEMENT
        return out


# -- function preservation, per head and per MLP ---------------------------------------------------------
def _probes(unit: LayerUnit, inputs: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(unit.layer)
    return torch.randn(inputs, PROBES, generator=g, dtype=F64), torch.randn(inputs, PROBES, generator=g, dtype=F64)


def _project(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, heads: int, d: int) -> torch.Tensor:
    y = weight @ x
    if bias is not None:
        y = y + bias[:, None]
    return y.reshape(heads, d, -1)


def qk_invariant(unit: LayerUnit, w: LayerWeights, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What every attention logit of every head is a function of, per head ([H, ...]): q·k, or under rotary
    embeddings the complex product of each rotated pair (so that it holds at every relative position)."""
    d = unit.head_dim
    q = _project(w.q, w.q_bias, x, unit.heads, d)
    k = _project(w.k, w.k_bias, y, unit.kv_heads, d).repeat_interleave(unit.group_size, dim=0)
    r = unit.rotary_dim if unit.family.rotary else 0
    parts = [torch.einsum("hdp,hdq->hpq", q[:, r:], k[:, r:]).reshape(unit.heads, -1)]
    if r:
        i, j = (list(t) for t in zip(*rotary_pairs(r, unit.family.rotary or ""), strict=True))
        zq = torch.complex(q[:, i], q[:, j])
        zk = torch.complex(k[:, i], k[:, j])
        pairs = torch.einsum("hjp,hjq->hjpq", zq, zk.conj()).reshape(unit.heads, -1)
        parts += [pairs.real, pairs.imag]
    return torch.cat(parts, dim=1)


def vo_invariant(unit: LayerUnit, w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
    """Each head's contribution to the output for value inputs ``x``, per head ([H, out·p])."""
    d = unit.head_dim
    v = _project(w.v, w.v_bias, x, unit.kv_heads, d).repeat_interleave(unit.group_size, dim=0)  # [H, d, p]
    o = w.o.reshape(w.o.shape[0], unit.heads, d)
    return torch.einsum("ohd,hdp->hop", o, v).reshape(unit.heads, -1)


def mlp_invariant(w: LayerWeights, x: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """The MLP's output for inputs ``x`` with tanh standing in for its activation (any elementwise function
    tells a consistent neuron permutation from a broken one), summed over blocks of neurons."""
    out = torch.zeros(w.down.shape[0], x.shape[1], dtype=F64)
    for start in range(0, w.up.shape[0], block):
        rows = slice(start, start + block)
        hidden = w.up[rows] @ x
        if w.up_bias is not None:
            hidden = hidden + w.up_bias[rows, None]
        if w.gate is None:
            hidden = torch.tanh(hidden)
        else:
            gate = w.gate[rows] @ x + (w.gate_bias[rows, None] if w.gate_bias is not None else 0.0)
            hidden = torch.tanh(gate) * hidden
        out += w.down[:, rows] @ hidden
    return out.reshape(1, -1)


def invariant_errors(unit: LayerUnit, orig: LayerWeights, prot: LayerWeights, head_order: torch.Tensor
                     ) -> dict[str, float]:
    """Largest per-head relative change of the Q/K and V/O invariants (protected head h' against original head
    ``head_order[h']``) and relative change of the MLP's output (0 for a branch left alone)."""
    x, y = _probes(unit, orig.q.shape[1])

    def worst(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((b - a).norm(dim=1) / a.norm(dim=1).clamp_min(1e-30)).max())

    return {"qk": worst(qk_invariant(unit, orig, x, y)[head_order], qk_invariant(unit, prot, x, y)) if unit.qk
            else 0.0,
            "vo": worst(vo_invariant(unit, orig, x)[head_order], vo_invariant(unit, prot, x)),
            "mlp": worst(mlp_invariant(orig, x), mlp_invariant(prot, x))}


# -- function preservation, end to end -------------------------------------------------------------
@contextlib.contextmanager
def _quiet_transformers() -> Iterator[Any]:
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield transformers
    finally:
        transformers.logging.set_verbosity(level)


def model_inputs(plan: Plan, config: dict[str, Any], batch: int = 2, length: int = 12, seed: int = 0
                 ) -> dict[str, torch.Tensor]:
    """Random inputs for every tower of the model (token ids and/or pixels), reproducible."""
    g = torch.Generator().manual_seed(seed)
    inputs: dict[str, torch.Tensor] = {}
    for tower in plan.family.towers:
        if not any(u.tower == tower.name for u in plan.units):
            continue
        sub = tower_config(config, tower)
        if tower.inputs == "image":
            size = int(sub.get("image_size", 224))
            inputs["pixel_values"] = torch.randn(batch, int(sub.get("num_channels", 3)), size, size, generator=g)
        else:
            vocab = int(sub.get("vocab_size", 1000))
            limit = int(sub.get("max_position_embeddings") or sub.get("n_positions") or length)
            inputs["input_ids"] = torch.randint(0, vocab, (batch, min(length, limit)), generator=g)
    return inputs


def _outputs(output: Any) -> Iterator[tuple[str, torch.Tensor]]:
    items = output.items() if hasattr(output, "items") else enumerate(output)
    for key, value in items:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            yield str(key), value
        elif isinstance(value, (tuple, list)) or hasattr(value, "items"):
            for sub, tensor in _outputs(value):
                yield f"{key}.{sub}", tensor


def run_model(path: Path, inputs: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
              ) -> dict[str, torch.Tensor]:
    """The model's outputs (every floating tensor it returns) on ``inputs``, loaded with AutoModel."""
    # A head the checkpoint lacks (e.g. a pooler under AutoModel) is initialised at random: seed it identically.
    with _quiet_transformers() as transformers, torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.AutoModel.from_pretrained(path, dtype=dtype)
    model.eval()
    kwargs: dict[str, Any] = dict(inputs)
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    with torch.no_grad():
        return {k: v.float() for k, v in _outputs(model(**kwargs))}


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over outputs of max|a − b| / max|a|."""
    worst = 0.0
    for key, ref in a.items():
        scale = float(ref.abs().max().clamp_min(1e-30))
        worst = max(worst, float((b[key] - ref).abs().max()) / scale)
    return worst


def forward_check(original: Path, protected: Path, plan: Plan, config: dict[str, Any], dtype: torch.dtype
                  ) -> dict[str, Any]:
    """Run original and protected through transformers' AutoModel (float32) on random inputs."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return {"ran": False, "reason": "transformers is not installed; the per-head invariants above were checked"}
    inputs = model_inputs(plan, config)
    before = run_model(original, inputs)
    after = run_model(protected, inputs)
    error = max_relative_difference(before, after)
    limit = tolerance(dtype)
    return {"ran": True, "inputs": {k: list(v.shape) for k, v in inputs.items()}, "outputs": len(before),
            "max_relative_error": error, "tolerance": limit, "passed": error <= limit}
