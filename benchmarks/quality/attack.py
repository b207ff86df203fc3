"""The anchor attack on a MergeLock-protected model, applied to the whole model (not only measured, as
``mergeops protect`` does): for every attention layer, ``mergeops.protect.checks.anchor_attack`` fits each
head's transform by least squares from (public base, protected) weights and undoes it. Everything else is
copied from the protected model. The result is the model an attacker holding the public base would merge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergeops.model import ModelFolder, ModelWriter, TensorSpec
from mergeops.protect.architectures import resolve
from mergeops.protect.checks import anchor_attack, relative_change
from mergeops.protect.heads import load, store

ROLES = ("q", "k", "v", "o")


def write_attacked(protected: Path, anchor: Path, out: Path, original: Path) -> dict[str, Any]:
    """Write the attacker's recovered model to ``out``; report how far the attention weights are from the
    ``original`` (the unprotected fine-tune) before and after the attack, and how far the anchor is."""
    distances: dict[str, list[float]] = {"protected": [], "recovered": [], "anchor": []}
    with ModelFolder.open(protected) as prot, ModelFolder.open(anchor) as base, ModelFolder.open(original) as orig:
        plan = resolve(prot)
        unit_of = {name: unit for unit in plan.units for name in unit.tensor_names}
        dtypes = {name: info.dtype for name, info in prot.tensors.items()}
        specs = [TensorSpec(name, info.dtype, info.shape) for name, info in prot.tensors.items()]
        writer = ModelWriter(out, specs, metadata={"benchmark": "anchor attack on a MergeLock-protected model"},
                             donor=protected)
        written: set[str] = set()
        with writer:
            for name in writer.layout_order:
                unit = unit_of.get(name)
                if unit is None:
                    writer.write(name, prot.read(name))
                    continue
                if name in written:
                    continue  # written with the first tensor of its layer
                written.update(unit.tensor_names)
                locked, public, truth = load(unit, prot.read), load(unit, base.read), load(unit, orig.read)
                recovered = anchor_attack(unit, locked, public)
                for tensor_name, tensor in store(unit, recovered, dtypes).items():
                    writer.write(tensor_name, tensor)
                for role in ROLES:
                    for what, weights in (("protected", locked), ("recovered", recovered), ("anchor", public)):
                        distances[what].append(relative_change(weights.role(role), truth.role(role)))  # type: ignore[arg-type]
    return {"layers": len(plan.units),
            "mean_relative_distance_to_finetune": {k: sum(v) / len(v) for k, v in distances.items()},
            "max_relative_distance_to_finetune": {k: max(v) for k, v in distances.items()}}
