"""The anchor attack on MergeLock (SPEC §8, "Honesty"): what someone holding the public base model undoes.

MergeLock's transforms are signed permutations scaled by powers of two along one axis of each tensor, and the
scheme is public. An attacker who has a model close to the original (its public base: a fine-tune moves little)
matches every slice of a protected tensor to the anchor's slice it is most parallel to (|cosine|, an optimal
assignment with ``scipy.optimize.linear_sum_assignment``), fits each slice's scale by least squares, rounds it
to a signed power of two, and undoes the map. ``protect`` runs this on a sample of layers and reports how much
of the protection it undoes; :func:`write_recovered` applies it to a whole model (for the quality benchmark).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from mergeops.model import ModelFolder, ModelWriter, TensorSpec
from mergeops.protect.architectures import Plan, resolve
from mergeops.protect.layer import TensorMap, tensor_maps
from mergeops.protect.transforms import LayerTransform, Monomial

ATTACK_LAYERS = 8  # layers the attack is measured on at protect time (evenly spaced), bounding its cost
PROXY_ANCHOR_NOISE = 0.05  # without a base model: the anchor is this model plus this relative Gaussian noise
OPTIMAL_MATCH_LIMIT = 4096  # slices; above it the assignment is greedy (argmax), which a hurried attacker uses
SKETCH = 512  # slices longer than this are compared through a fixed random projection to this many dimensions
F64 = torch.float64


def _slices(tensor: torch.Tensor, axis: int) -> torch.Tensor:
    """The slices along ``axis`` as rows of a float64 matrix (a 1-D tensor gives one-element rows)."""
    return tensor.to(F64).movedim(axis, 0).reshape(tensor.shape[axis], -1)


def estimate(protected: torch.Tensor, anchor: torch.Tensor, axis: int) -> Monomial:
    """The map an attacker fits: slice i of ``protected`` ≈ coef[i] · slice perm[i] of ``anchor``."""
    from scipy.optimize import linear_sum_assignment

    p, a = _slices(protected, axis), _slices(anchor, axis)
    if p.shape[1] > SKETCH:
        g = torch.Generator().manual_seed(0)
        sketch = torch.randn(p.shape[1], SKETCH, generator=g, dtype=F64)
        p_s, a_s = p @ sketch, a @ sketch
    else:
        p_s, a_s = p, a
    cosine = (p_s / p_s.norm(dim=1, keepdim=True).clamp_min(1e-300)) @ \
        (a_s / a_s.norm(dim=1, keepdim=True).clamp_min(1e-300)).T
    score = cosine.abs()
    if len(score) <= OPTIMAL_MATCH_LIMIT:
        rows, cols = linear_sum_assignment(score.numpy(), maximize=True)
        perm = torch.empty(len(score), dtype=torch.long)
        perm[torch.from_numpy(rows)] = torch.from_numpy(cols)
    else:
        perm = score.argmax(dim=1)
    matched = a[perm]
    scale = (p * matched).sum(dim=1) / (matched * matched).sum(dim=1).clamp_min(1e-300)
    exponent = torch.round(torch.log2(scale.abs().clamp_min(1e-300)))
    coef = torch.sign(scale).where(scale != 0, torch.ones_like(scale)) * torch.pow(2.0, exponent)
    return Monomial(perm, coef)


def proxy_anchor(tensor: torch.Tensor, seed: int, noise: float = PROXY_ANCHOR_NOISE) -> torch.Tensor:
    """A stand-in for the public base model's tensor: this one plus ``noise`` relative Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    t = tensor.to(F64)
    scale = noise * torch.linalg.vector_norm(t) / math.sqrt(max(t.numel(), 1))
    return t + scale * torch.randn(t.shape, generator=g, dtype=F64)


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(F64), b.to(F64)
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


@dataclass
class AttackMeasurement:
    """What the attack recovers on the sampled layers, against the true original."""

    anchor_label: str
    layers: list[str] = field(default_factory=list)
    # per weight matrix: (protected distance, recovered distance, anchor distance) from the original
    distances: list[tuple[float, float, float]] = field(default_factory=list)
    slices_matched: int = 0  # slices whose true source the attacker found
    slices: int = 0

    def add(self, label: str, maps: list[TensorMap], original: dict[str, torch.Tensor],
            written: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]) -> None:
        self.layers.append(label)
        for m in maps:
            if original[m.name].dim() < 2:
                continue  # biases follow their weight's map; the attack fits it on the weight
            fitted = estimate(written[m.name], anchor[m.name], m.axis)
            recovered = fitted.inverse().apply(written[m.name], m.axis)
            self.distances.append((_distance(written[m.name], original[m.name]),
                                   _distance(recovered, original[m.name]),
                                   _distance(anchor[m.name], original[m.name])))
            self.slices_matched += int((fitted.perm == m.monomial.perm).sum())
            self.slices += len(fitted)

    def report(self) -> dict[str, Any]:
        if not self.distances:
            return {}
        before, after, anchor = (sum(x[i] for x in self.distances) / len(self.distances) for i in range(3))
        undone = max(0.0, 1.0 - after / before) if before else 0.0
        matched = self.slices_matched / self.slices if self.slices else 0.0
        return {
            "attack": "per tensor: optimal assignment of slices by |cosine| to the anchor's, least-squares scale "
                      "rounded to a signed power of two, map undone",
            "anchor": self.anchor_label,
            "anchor_distance": round(anchor, 4),
            "distance_before_attack": round(before, 4),
            "distance_after_attack": round(after, 4),
            "protection_undone": round(undone, 4),
            "slices_matched": round(matched, 4),
            "layers_measured": self.layers,
            "summary": (f"someone holding a model {anchor:.1%} away from this one (such as its public base) finds "
                        f"the true position of {matched:.0%} of the permuted rows and columns and recovers weights "
                        f"{after:.1%} away from the originals, undoing {undone:.0%} of the protection ({before:.0%} "
                        "away); MergeLock stops casual and accidental merging, not a determined attacker with the "
                        "base model"),
        }


def attack_sample(plan: Plan) -> set[str]:
    """The labels of the layers the attack is measured on."""
    units = plan.units
    if len(units) <= ATTACK_LAYERS:
        return {u.label for u in units}
    step = (len(units) - 1) / (ATTACK_LAYERS - 1)
    return {units[round(i * step)].label for i in range(ATTACK_LAYERS)}


def write_recovered(protected: str | os.PathLike[str], anchor: str | os.PathLike[str],
                    out: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the model an attacker recovers from ``protected`` with ``anchor`` (the public base) to ``out``.

    Works on a copy whose MergeLock marks were stripped too: it needs only the protected weights, the config
    and the anchor. Returns how many tensors were refit."""
    with ModelFolder.open(protected) as prot, ModelFolder.open(anchor) as base:
        plan = resolve(prot)
        refit: dict[str, tuple[int, Monomial | None]] = {}
        for unit in plan.units:
            # Which axis each tensor was transformed along is public (the scheme); the maps are what is fitted.
            shape_only = LayerTransform(*(_placeholder(unit, role) for role in ("q", "k", "v", "o", "up", "gate",
                                                                                "down")), torch.arange(unit.heads))
            for m in tensor_maps(unit, shape_only):
                refit[m.name] = (m.axis, None)
        weights_of = _bias_owners(plan)
        specs = [TensorSpec(name, info.dtype, info.shape) for name, info in prot.tensors.items()]
        fitted: dict[str, Monomial] = {}
        with ModelWriter(out, specs, metadata={"mergeops.note": "anchor attack on a MergeLock-protected model"},
                         donor=prot.path) as writer:
            for name in sorted(prot.tensors, key=lambda n: (n in weights_of, n)):  # weights before their biases
                tensor = prot.read(name)
                if name in refit:
                    axis = refit[name][0]
                    owner = weights_of.get(name)
                    found = fitted[owner] if owner else estimate(tensor, base.read(name), axis)
                    fitted[name] = found
                    tensor = found.inverse().apply(tensor, axis)
                writer.write(name, tensor)
    return {"layers": len(plan.units), "tensors_refit": len(refit)}


def _placeholder(unit: Any, role: str) -> Monomial | None:
    sizes = {"q": unit.heads * unit.head_dim if unit.qk else 0, "k": unit.kv_heads * unit.head_dim if unit.qk else 0,
             "v": unit.kv_heads * unit.head_dim, "o": unit.heads * unit.head_dim, "up": unit.mlp_size,
             "gate": unit.mlp_size if unit.mlp_gated else 0, "down": unit.mlp_size}
    return Monomial.identity(sizes[role]) if sizes[role] else None


def _bias_owners(plan: Plan) -> dict[str, str]:
    """Bias tensor -> the weight whose map it shares."""
    return {unit.names[f"{role}_bias"]: unit.names[role] for unit in plan.units
            for role in ("q", "k", "v", "up", "gate") if f"{role}_bias" in unit.names}


__all__ = ["AttackMeasurement", "attack_sample", "estimate", "proxy_anchor", "write_recovered"]
