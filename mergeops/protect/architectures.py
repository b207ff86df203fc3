"""MergeLock's view of the architecture table (SPEC §8): a model folder as the layers it protects.

:func:`resolve` turns a model folder into a list of :class:`LayerUnit` (one per layer and tower) from the table in
:mod:`mergeops.model.architectures` alone, with each layer's head geometry checked against config.json. Anything
not in the table is refused before a file is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mergeops.errors import UsageError
from mergeops.model import ModelFolder
from mergeops.model.architectures import (
    FUSED_CONV1D,
    Family,
    Tower,
    config_value,
    family_for,
    layer_pattern,
    layer_roles,
    supported,
    tower_config,
    towers_of,
)


@dataclass(frozen=True)
class LayerUnit:
    """One layer to protect: its attention and MLP tensors, its head geometry and MLP width."""

    family: Family
    tower: str
    layer: int
    # role -> tensor name; roles q k v o up down (+ gate) weights, q_bias k_bias v_bias up_bias gate_bias if present
    names: Mapping[str, str]
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int  # rotated dimensions of each head (0 when not rotary); the first rotary_dim of head_dim
    qk: bool  # False: the query/key symmetry is unsafe here, only V/O is transformed
    mlp_size: int  # hidden neurons of the MLP
    mlp_gated: bool

    @property
    def label(self) -> str:
        """Names the unit in key derivation and reports: ``layer=3`` or ``tower=text|layer=3``."""
        return f"tower={self.tower}|layer={self.layer}" if self.tower else f"layer={self.layer}"

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    @property
    def tensor_names(self) -> list[str]:
        return list(dict.fromkeys(self.names.values()))


@dataclass(frozen=True)
class Plan:
    family: Family
    architecture: str
    units: tuple[LayerUnit, ...]
    notes: tuple[str, ...]

    @property
    def qk(self) -> bool:
        return any(u.qk for u in self.units)


def resolve(folder: ModelFolder) -> Plan:
    """Every attention layer of ``folder`` with its geometry, or UsageError naming what is not supported."""
    config = folder.config
    where = folder.path
    if config is None:
        raise UsageError(f"{where} has no config.json, so its attention layout (heads, rotary embeddings) is unknown; "
                         f"MergeLock protects {supported()} model folders with their config.json.")
    family = family_for(config)
    architecture = folder.architecture or "unknown"
    if family is None:
        raise UsageError(f"{where} is a {architecture} model (model_type {config.get('model_type')!r}), which "
                         f"MergeLock cannot protect; supported architectures: {supported()}. Nothing was written.")
    units: list[LayerUnit] = []
    notes: list[str] = []
    blocked = [f"{key} = {config.get(key)!r}" for key, values in family.qk_config_blockers.items()
               if config.get(key) in values]
    for tower in towers_of(family, config):
        units += _tower_units(folder, family, tower, tower_config(config, tower), blocked)
    if not units:
        raise UsageError(f"{where} says it is {family.label} ({architecture}) but none of its tensors is named like "
                         f"{family.label} attention (e.g. {family.prefixes[-1]}{family.towers[0].prefix}"
                         f"{family.towers[0].layer.format(i=0)}"
                         f"{family.q}.weight); nothing was written.")
    if any(not u.qk for u in units):
        reason = ", ".join(blocked) if blocked else "per-head q/k normalisation (" + ", ".join(family.qk_norm) + ")"
        notes.append(f"query/key weights are not protected ({reason} does not commute with the Q/K transform); "
                     "value/output weights are.")
    return Plan(family, architecture, tuple(units), tuple(notes))


def _tower_units(folder: ModelFolder, family: Family, tower: Tower, config: Mapping[str, Any],
                 blocked: list[str]) -> list[LayerUnit]:
    pattern = layer_pattern(family, tower, family.q, "weight")
    units = []
    for name in folder.tensors:
        match = pattern.match(name)
        if match:
            units.append(_unit(folder, family, tower, config, match["p"] + tower.layer.format(i=match["i"]),
                               int(match["i"]), blocked))
    return sorted(units, key=lambda u: u.layer)


def _unit(folder: ModelFolder, family: Family, tower: Tower, config: Mapping[str, Any], base: str, index: int,
          blocked: list[str]) -> LayerUnit:
    where = f"{folder.path}: layer {base.rstrip('.')}"
    roles = tuple(r.value for r in layer_roles(family))
    names = {role: f"{base}{getattr(family, role)}.weight" for role in roles}
    for role in ("q", "k", "v", "up", "gate"):
        if role in names and f"{base}{getattr(family, role)}.bias" in folder.tensors:
            names[f"{role}_bias"] = f"{base}{getattr(family, role)}.bias"
    for name in names.values():
        if name not in folder.tensors:
            raise UsageError(f"{where} has no tensor {name!r}, which a {family.label} layer needs; the checkpoint "
                             "is incomplete or not a standard layout. Nothing was written.")
        if not folder.tensors[name].dtype.is_floating_point:
            raise UsageError(f"{where}: {name} is stored as {folder.tensors[name].dtype}; MergeLock needs floating "
                             "point attention weights (dequantize first). Nothing was written.")
    heads = config_value(config, family.heads_keys)
    if not isinstance(heads, int) or heads <= 0:
        raise UsageError(f"{folder.path}/config.json has no head count ({' or '.join(family.heads_keys)}); "
                         "it is needed to find each attention head. Nothing was written.")
    shape = {role: folder.tensors[names[role]].shape for role in ("q", "k", "v", "o")}
    if family.layout == FUSED_CONV1D:
        fused = shape["q"]
        if len(fused) != 2 or fused[1] % 3:
            raise UsageError(f"{where}: {names['q']} has shape {fused}, not [in, 3·E]. Nothing was written.")
        q_rows = kv_rows = fused[1] // 3
        o_in = shape["o"][0]
        mlp_size, mlp_in = folder.tensors[names["up"]].shape[-1], folder.tensors[names["down"]].shape[0]
    else:
        q_rows, kv_rows, o_in = shape["q"][0], shape["k"][0], shape["o"][-1]
        mlp_size, mlp_in = folder.tensors[names["up"]].shape[0], folder.tensors[names["down"]].shape[-1]
        if shape["v"][0] != kv_rows:
            raise UsageError(f"{where}: key and value projections differ in size ({kv_rows} vs {shape['v'][0]}). "
                             "Nothing was written.")
    mlp_shapes = {r: folder.tensors[names[r]].shape for r in ("up", "down", "gate") if r in names}
    if mlp_in != mlp_size or any(len(s) != 2 for s in mlp_shapes.values()) or (
            "gate" in mlp_shapes and mlp_shapes["gate"] != mlp_shapes["up"]):
        raise UsageError(f"{where}: MLP shapes ({', '.join(f'{r} {list(s)}' for r, s in mlp_shapes.items())}) do "
                         "not fit together. Nothing was written.")
    head_dim = config_value(config, family.head_dim_keys) or (q_rows // heads)
    kv_heads = kv_rows // head_dim if head_dim else 0
    declared_kv = config_value(config, family.kv_heads_keys)
    if (q_rows != heads * head_dim or kv_rows != kv_heads * head_dim or kv_heads == 0 or heads % kv_heads
            or o_in != q_rows or (declared_kv is not None and declared_kv != kv_heads)):
        raise UsageError(f"{where}: attention shapes (q {shape['q']}, k {shape['k']}, o {shape['o']}) do not match "
                         f"{heads} heads of size {head_dim}" + (f" with {declared_kv} key/value heads"
                                                                if declared_kv is not None else "")
                         + " from config.json. Nothing was written.")
    rotary_dim = 0
    if family.rotary:
        fraction = config_value(config, family.rotary_fraction_keys)
        rotary_dim = int(head_dim * (1.0 if fraction is None else float(fraction)))
        rotary_dim -= rotary_dim % 2
    qk = not blocked and not any(f"{base}{n}" in folder.tensors for n in family.qk_norm)
    return LayerUnit(family=family, tower=tower.name, layer=index, names=names, heads=heads, kv_heads=kv_heads,
                     head_dim=head_dim, rotary_dim=rotary_dim, qk=qk, mlp_size=mlp_size, mlp_gated=bool(family.gate))
