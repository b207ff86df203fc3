"""What ``protect`` measures on the model it protects: how far the weights moved, whether the function is
unchanged, and how much of the protection an anchor attack undoes (SPEC §8, "Honesty").

All of it is computed per layer while the layer is in memory (streaming), in float64, from the weights as
they were actually written (after the cast to the stored dtype).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergeops.protect.architectures import AttentionUnit, Plan, tower_config
from mergeops.protect.heads import F64, HeadWeights
from mergeops.protect.matrices import rotary_pairs

MIN_MOVEMENT = 0.3  # ‖W' − W‖/‖W‖ every transformed tensor must reach
PROBES = 8  # random inputs per layer for the per-head invariants
ATTACK_LAYERS = 8  # layers the anchor attack is measured on (evenly spaced), bounding its cost
PROXY_ANCHOR_NOISE = 0.05  # without a base model: the anchor is this model plus this relative Gaussian noise
FLOAT32_TOLERANCE = 1e-5  # SPEC §9: protected float32 outputs equal the original's to this relative error
ROLES = {"qk": ("q", "k"), "vo": ("v", "o")}


def tolerance(dtype: torch.dtype) -> float:
    """Allowed relative error of the function after protection, for weights stored in ``dtype``.

    Float32 and wider: 1e-5. Narrower types: the transformed weights are rounded once more, so the
    function moves by about one rounding of that type (relative eps/2 per weight, amplified by at most the
    matrices' condition number); allow 4 eps (measured: about 1 eps on MiniLM in bfloat16)."""
    if dtype.itemsize >= 4:
        return FLOAT32_TOLERANCE
    return 4 * torch.finfo(dtype).eps


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(new - old) / torch.linalg.vector_norm(old).clamp_min(1e-30))


@dataclass
class Measurements:
    anchor_label: str = ""
    movement: dict[str, list[float]] = field(default_factory=lambda: {"qk": [], "vo": []})
    invariant: dict[str, float] = field(default_factory=lambda: {"qk": 0.0, "vo": 0.0})
    attack: list[tuple[float, float, float]] = field(default_factory=list)  # (before, after, anchor distance)
    attack_layers: list[str] = field(default_factory=list)

    # -- per layer ------------------------------------------------------------------------------
    def add(self, unit: AttentionUnit, orig: HeadWeights, prot: HeadWeights) -> None:
        for branch, roles in ROLES.items():
            if branch == "qk" and not unit.qk:
                continue
            self.movement[branch] += [relative_change(prot.role(r), orig.role(r)) for r in roles]  # type: ignore[arg-type]
        qk_err, vo_err = invariant_errors(unit, orig, prot)
        self.invariant["qk"] = max(self.invariant["qk"], qk_err)
        self.invariant["vo"] = max(self.invariant["vo"], vo_err)

    def add_attack(self, unit: AttentionUnit, orig: HeadWeights, prot: HeadWeights, anchor: HeadWeights) -> None:
        self.attack_layers.append(unit.label)
        recovered = anchor_attack(unit, prot, anchor)
        for branch, roles in ROLES.items():
            if branch == "qk" and not unit.qk:
                continue
            for r in roles:
                old = orig.role(r)
                assert old is not None
                self.attack.append((relative_change(prot.role(r), old), relative_change(recovered.role(r), old),  # type: ignore[arg-type]
                                    relative_change(anchor.role(r), old)))  # type: ignore[arg-type]

    # -- summary --------------------------------------------------------------------------------
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

    def attack_report(self) -> dict[str, Any]:
        if not self.attack:
            return {}
        before, after, anchor = (sum(x[i] for x in self.attack) / len(self.attack) for i in range(3))
        undone = max(0.0, 1.0 - after / before) if before else 0.0
        return {
            "attack": "per-head least-squares fit of each head's transform from (anchor, protected) weights, "
                      "then undoing it",
            "anchor": self.anchor_label,
            "anchor_distance": round(anchor, 4),
            "distance_before_attack": round(before, 4),
            "distance_after_attack": round(after, 4),
            "protection_undone": round(undone, 4),
            "layers_measured": self.attack_layers,
            "summary": (f"someone holding a model {anchor:.1%} away from this one (such as its public base) recovers "
                        f"attention weights {after:.1%} away from the originals, undoing {undone:.0%} of the "
                        f"protection ({before:.0%} away); MergeLock stops casual and accidental merging, not a "
                        "determined attacker with the base model"),
        }


# -- function preservation, per head ---------------------------------------------------------------
def _probes(unit: AttentionUnit, inputs: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(unit.layer)
    return torch.randn(inputs, PROBES, generator=g, dtype=F64), torch.randn(inputs, PROBES, generator=g, dtype=F64)


def _project(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, heads: int, d: int) -> torch.Tensor:
    y = weight @ x
    if bias is not None:
        y = y + bias[:, None]
    return y.reshape(heads, d, -1)


def qk_invariant(unit: AttentionUnit, w: HeadWeights, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
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


def vo_invariant(unit: AttentionUnit, w: HeadWeights, x: torch.Tensor) -> torch.Tensor:
    """Each head's contribution to the output for value inputs ``x``, per head ([H, out·p])."""
    d = unit.head_dim
    v = _project(w.v, w.v_bias, x, unit.kv_heads, d).repeat_interleave(unit.group_size, dim=0)  # [H, d, p]
    o = w.o.reshape(w.o.shape[0], unit.heads, d)
    return torch.einsum("ohd,hdp->hop", o, v).reshape(unit.heads, -1)


def invariant_errors(unit: AttentionUnit, orig: HeadWeights, prot: HeadWeights) -> tuple[float, float]:
    """Largest per-head relative change of the Q/K and V/O invariants (0 for a branch left alone)."""
    x, y = _probes(unit, orig.q.shape[1])

    def worst(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((b - a).norm(dim=1) / a.norm(dim=1).clamp_min(1e-30)).max())

    qk = worst(qk_invariant(unit, orig, x, y), qk_invariant(unit, prot, x, y)) if unit.qk else 0.0
    return qk, worst(vo_invariant(unit, orig, x), vo_invariant(unit, prot, x))


# -- residual risk: the anchor attack --------------------------------------------------------------
def proxy_anchor(unit: AttentionUnit, w: HeadWeights, noise: float = PROXY_ANCHOR_NOISE) -> HeadWeights:
    """A stand-in for the public base model: this model's weights plus ``noise`` relative Gaussian noise."""
    g = torch.Generator().manual_seed(1000 + unit.layer)

    def near(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        scale = noise * torch.linalg.vector_norm(t) / math.sqrt(t.numel())
        return t + scale * torch.randn(t.shape, generator=g, dtype=F64)

    return HeadWeights(*(near(w.role(r)) for r in ("q", "k", "v", "o", "q_bias", "k_bias", "v_bias")))  # type: ignore[arg-type]


def anchor_attack(unit: AttentionUnit, prot: HeadWeights, anchor: HeadWeights) -> HeadWeights:
    """What an attacker holding ``anchor`` recovers: for every head, the d×d matrix that best maps the
    protected head onto the anchor's head (least squares, weights and bias together), applied."""
    d = unit.head_dim

    def rows(w: torch.Tensor, b: torch.Tensor | None, aw: torch.Tensor, ab: torch.Tensor | None, heads: int
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        p = w.reshape(heads, d, -1)
        a = aw.reshape(heads, d, -1)
        if b is not None and ab is not None:
            p = torch.cat([p, b.reshape(heads, d, 1)], dim=2)
            a = torch.cat([a, ab.reshape(heads, d, 1)], dim=2)
        # N = argmin ‖N·P − A‖ per head, by the normal equations N (P Pᵀ) = A Pᵀ (P has full row rank d).
        fit = torch.linalg.solve(torch.bmm(p, p.transpose(1, 2)), torch.bmm(p, a.transpose(1, 2)))  # Nᵀ
        rec = torch.bmm(fit.transpose(1, 2), p)
        if b is not None and ab is not None:
            return rec[:, :, :-1].reshape(w.shape), rec[:, :, -1].reshape(b.shape)
        return rec.reshape(w.shape), b

    q, qb = rows(prot.q, prot.q_bias, anchor.q, anchor.q_bias, unit.heads)
    k, kb = rows(prot.k, prot.k_bias, anchor.k, anchor.k_bias, unit.kv_heads)
    v, vb = rows(prot.v, prot.v_bias, anchor.v, anchor.v_bias, unit.kv_heads)
    po = prot.o.reshape(-1, unit.heads, d).transpose(0, 1)  # [H, out, d]
    ao = anchor.o.reshape(-1, unit.heads, d).transpose(0, 1)
    fit = torch.linalg.solve(torch.bmm(po.transpose(1, 2), po), torch.bmm(po.transpose(1, 2), ao))  # [H, d, d]
    o = torch.bmm(po, fit).transpose(0, 1).reshape(prot.o.shape)
    return HeadWeights(q, k, v, o, qb, kb, vb)


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
