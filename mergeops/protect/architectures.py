"""Where attention and MLPs live in each architecture MergeLock protects, as data (SPEC §8).

One :class:`Family` per architecture family says how to find its layers (name templates, with or without a
task-head prefix such as ``bert.`` or ``model.``), how q/k/v/o and the MLP are stored (separate ``nn.Linear``
weights in ``[out, in]`` layout, or GPT-2's fused, transposed ``Conv1D`` ``c_attn`` ``[in, 3·E]``, ``c_proj``
``[E, out]``, ``c_fc`` ``[in, F]``), whether the MLP is gated (SwiGLU), which config keys hold the head counts,
whether keys and queries are rotated (and how rotary dimensions are paired), and what makes the query/key
symmetry unsafe. :func:`resolve` turns a model folder into a list of :class:`LayerUnit` (one per layer and
tower) from that table alone; nothing else in the package knows architecture names. Anything not in the
table is refused before a file is written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mergeops.errors import UsageError
from mergeops.model import ModelFolder

SEPARATE = "separate"  # q, k, v, o are separate nn.Linear weights, [out, in]
FUSED_CONV1D = "fused_conv1d"  # GPT-2: c_attn Conv1D [in, 3·E] holding [Q | K | V] columns; c_proj Conv1D [E, out]

ROTARY_HALF = "half"  # Hugging Face rotate_half: dimension i pairs with i + r/2 (Llama, Mistral, Qwen2)
ROTARY_ADJACENT = "adjacent"  # GPT-J / Meta-original layout: 2i pairs with 2i + 1 (no family below uses it)


@dataclass(frozen=True)
class Tower:
    """One stack of attention layers (a model has one; CLIP has a text and a vision tower)."""

    name: str  # "" when the family has a single tower
    layer: str  # name template of a layer, "{i}" standing for its index, e.g. "encoder.layer.{i}."
    config: str | None = None  # sub-config holding this tower's head counts ("text_config"); root if absent
    inputs: str = "text"  # what a verification forward pass feeds this tower: "text" or "image"
    prefix: str = ""  # the tower's own prefix inside a multi-tower model ("text_model.")
    alone: str | None = None  # model_type of a model that is this tower alone, saved without its prefix


@dataclass(frozen=True)
class Family:
    name: str
    label: str  # how users know it
    model_types: tuple[str, ...]  # config.json "model_type" values
    towers: tuple[Tower, ...]
    prefixes: tuple[str, ...]  # task-head prefixes a checkpoint may put before every layer name
    q: str  # module names relative to the layer; under FUSED_CONV1D q, k and v name the same fused module
    k: str
    v: str
    o: str
    up: str  # the MLP's input projection (its hidden neurons are its rows, or Conv1D columns)
    down: str  # the MLP's output projection (hidden neurons are its columns, or Conv1D rows)
    gate: str | None = None  # gated MLPs (SwiGLU): act(gate·x) ⊙ (up·x)
    layout: str = SEPARATE
    heads_keys: tuple[str, ...] = ("num_attention_heads",)
    kv_heads_keys: tuple[str, ...] = ("num_key_value_heads",)
    head_dim_keys: tuple[str, ...] = ("head_dim",)
    rotary: str | None = None  # ROTARY_HALF / ROTARY_ADJACENT, None when queries and keys are not rotated
    rotary_fraction_keys: tuple[str, ...] = ("partial_rotary_factor", "rope_parameters.partial_rotary_factor")
    # Layer-relative tensors whose presence means per-head q/k normalisation: then only V/O is protected.
    qk_norm: tuple[str, ...] = ()
    # Config values under which attention logits are not a function of q·k alone: then only V/O is protected.
    qk_config_blockers: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)


def _rotary_decoder(name: str, label: str, model_types: tuple[str, ...], **extra: Any) -> Family:
    """The Llama layout shared by Mistral, Qwen2 and Qwen3: separate projections, rotate_half RoPE, GQA."""
    return Family(name=name, label=label, model_types=model_types, towers=(Tower("", "layers.{i}."),),
                  prefixes=("", "model."), q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                  o="self_attn.o_proj", up="mlp.up_proj", gate="mlp.gate_proj", down="mlp.down_proj",
                  rotary=ROTARY_HALF, **extra)


FAMILIES: tuple[Family, ...] = (
    Family(name="bert", label="BERT", model_types=("bert",), towers=(Tower("", "encoder.layer.{i}."),),
           prefixes=("", "bert."), q="attention.self.query", k="attention.self.key", v="attention.self.value",
           o="attention.output.dense", up="intermediate.dense", down="output.dense",
           qk_config_blockers={"position_embedding_type": ("relative_key", "relative_key_query")}),
    Family(name="roberta", label="RoBERTa", model_types=("roberta",), towers=(Tower("", "encoder.layer.{i}."),),
           prefixes=("", "roberta."), q="attention.self.query", k="attention.self.key", v="attention.self.value",
           o="attention.output.dense", up="intermediate.dense", down="output.dense",
           qk_config_blockers={"position_embedding_type": ("relative_key", "relative_key_query")}),
    Family(name="vit", label="ViT", model_types=("vit",),
           towers=(Tower("", "encoder.layer.{i}.", inputs="image"),), prefixes=("", "vit."),
           q="attention.attention.query", k="attention.attention.key", v="attention.attention.value",
           o="attention.output.dense", up="intermediate.dense", down="output.dense"),
    Family(name="clip", label="CLIP", model_types=("clip", "clip_text_model", "clip_vision_model"),
           towers=(Tower("text", "encoder.layers.{i}.", config="text_config", inputs="text", prefix="text_model.",
                         alone="clip_text_model"),
                   Tower("vision", "encoder.layers.{i}.", config="vision_config", inputs="image",
                         prefix="vision_model.", alone="clip_vision_model")),
           prefixes=("",), q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj",
           up="mlp.fc1", down="mlp.fc2"),
    Family(name="gpt2", label="GPT-2", model_types=("gpt2",), towers=(Tower("", "h.{i}."),),
           prefixes=("", "transformer."), q="attn.c_attn", k="attn.c_attn", v="attn.c_attn", o="attn.c_proj",
           up="mlp.c_fc", down="mlp.c_proj", layout=FUSED_CONV1D, heads_keys=("n_head", "num_attention_heads")),
    _rotary_decoder("llama", "Llama", ("llama",)),
    _rotary_decoder("mistral", "Mistral", ("mistral",)),
    _rotary_decoder("qwen2", "Qwen2", ("qwen2",)),
    _rotary_decoder("qwen3", "Qwen3", ("qwen3",), qk_norm=("self_attn.q_norm.weight", "self_attn.k_norm.weight")),
)


def supported() -> str:
    """The supported architectures, for messages."""
    return ", ".join(f.label for f in FAMILIES)


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


def _lookup(config: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            return node
    return None


def family_for(config: Mapping[str, Any] | None) -> Family | None:
    model_type = (config or {}).get("model_type")
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def towers_of(family: Family, config: Mapping[str, Any]) -> tuple[Tower, ...]:
    """The towers a model of this config has: one tower saved alone (without its prefix), or all of them."""
    alone = [t for t in family.towers if t.alone and t.alone == config.get("model_type")]
    return tuple(Tower(t.name, t.layer, t.config, t.inputs, "", t.alone) for t in alone) if alone else family.towers


def tower_config(config: Mapping[str, Any], tower: Tower) -> Mapping[str, Any]:
    sub = config.get(tower.config) if tower.config else None
    return sub if isinstance(sub, Mapping) else config


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
    prefixes = "|".join(re.escape(p + tower.prefix) for p in family.prefixes)
    layer = re.escape(tower.layer).replace(re.escape("{i}"), r"(?P<i>\d+)")
    pattern = re.compile(rf"^(?P<p>{prefixes}){layer}{re.escape(family.q)}\.weight$")
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
    roles = ("q", "k", "v", "o", "up", "down", *(("gate",) if family.gate else ()))
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
    heads = _lookup(config, family.heads_keys)
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
    head_dim = _lookup(config, family.head_dim_keys) or (q_rows // heads)
    kv_heads = kv_rows // head_dim if head_dim else 0
    declared_kv = _lookup(config, family.kv_heads_keys)
    if (q_rows != heads * head_dim or kv_rows != kv_heads * head_dim or kv_heads == 0 or heads % kv_heads
            or o_in != q_rows or (declared_kv is not None and declared_kv != kv_heads)):
        raise UsageError(f"{where}: attention shapes (q {shape['q']}, k {shape['k']}, o {shape['o']}) do not match "
                         f"{heads} heads of size {head_dim}" + (f" with {declared_kv} key/value heads"
                                                                if declared_kv is not None else "")
                         + " from config.json. Nothing was written.")
    rotary_dim = 0
    if family.rotary:
        fraction = _lookup(config, family.rotary_fraction_keys)
        rotary_dim = int(head_dim * (1.0 if fraction is None else float(fraction)))
        rotary_dim -= rotary_dim % 2
    qk = not blocked and not any(f"{base}{n}" in folder.tensors for n in family.qk_norm)
    return LayerUnit(family=family, tower=tower.name, layer=index, names=names, heads=heads, kv_heads=kv_heads,
                     head_dim=head_dim, rotary_dim=rotary_dim, qk=qk, mlp_size=mlp_size, mlp_gated=bool(family.gate))
