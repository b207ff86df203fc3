"""Architecture knowledge as data: which tensor of a transformer is an embedding, a norm, a bias, an attention
q/k/v/o projection or an MLP up/gate/down projection.

Two kinds of rule live here and nowhere else:

* Name rules that hold for every architecture, used when no family is known: embedding-like lookup tables
  (``embed``, GPT-2's ``wte``/``wpe``, ``position``, ``token_type``, T5's ``shared``), norms (``norm`` in any
  case, GPT-2's ``ln_*``), biases, and the parameter suffixes ``.weight``/``.bias``; plus the name patterns the
  Hugging Face Trainer uses to keep norms and biases out of weight decay.
* One :class:`Family` per architecture family: where its layers are (name templates, with or without a task-head
  prefix such as ``bert.`` or ``model.``), which module of a layer is q, k, v, o, up, gate and down, how they are
  stored (separate ``nn.Linear`` weights in ``[out, in]`` layout, or GPT-2's fused, transposed ``Conv1D``
  ``c_attn`` ``[in, 3·E]``, ``c_proj`` ``[E, out]``, ``c_fc`` ``[in, F]``), which config keys hold the head
  counts, whether keys and queries are rotated (and how rotary dimensions are paired), and what makes the
  query/key symmetry unsafe.

Also here: which tensors have a row per token (:func:`is_vocab`: what a fine-tune that adds tokens resizes) and
which output tensors each family ties to its input embeddings, with its ``tie_word_embeddings`` default
(:func:`tied_weights`).

OPCM's default projection rule, intake's float check, the curvature import's no-decay split and MergeLock's
layer units all read from here. A low-layer module: it imports nothing from the mergeops stages.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class Role(enum.Enum):
    """What a tensor is for. The layer roles' values are the :class:`Family` fields naming their module."""

    EMBEDDING = "embedding"
    NORM = "norm"
    BIAS = "bias"
    Q = "q"
    K = "k"
    V = "v"
    O = "o"  # noqa: E741 - the attention output projection's usual name
    UP = "up"
    GATE = "gate"
    DOWN = "down"


LAYER_ROLES = (Role.Q, Role.K, Role.V, Role.O, Role.UP, Role.DOWN, Role.GATE)

# -- name rules for every architecture ---------------------------------------------------------------------
# Rows of a lookup table rather than linear maps (token, position, token-type and shared embeddings).
_EMBEDDING_NAME = re.compile(r"embed|wte|wpe|position|token_type|shared")
_NORM_NAME = re.compile(r"norm|(?:^|\.)ln_", re.IGNORECASE)
_BIAS_NAME = re.compile(r"bias", re.IGNORECASE)
# Tensors named like trainable parameters; buffers such as BERT's ``position_ids`` are named otherwise.
PARAMETER_SUFFIXES = (".weight", ".bias")
# transformers >= 4.49, Trainer.get_decay_parameter_names: no weight decay for a lower-cased full parameter name
# matching any of these (besides parameters of nn.LayerNorm modules, found by type).
TRAINER_NO_DECAY = tuple(re.compile(p) for p in (
    r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"))


# Buffers: state a model computes, not trained, which ``save_pretrained`` of newer transformers leaves out (BERT's
# position and token-type ids, rotary inverse frequencies, GPT-2's causal mask) while older checkpoints hold them.
_BUFFER_NAME = re.compile(r"(?:^|\.)(?:position_ids|token_type_ids|inv_freq|original_inv_freq|masked_bias)$"
                          r"|(?:^|\.)attn\.bias$")


def is_buffer(name: str) -> bool:
    """Whether ``name`` is a buffer a checkpoint may leave out: the base's value is the model's either way."""
    return _BUFFER_NAME.search(name) is not None


# Tensors with one row (or entry) per token of the vocabulary: input embeddings, output heads and their biases (BERT's
# ``cls.predictions.bias``, RoBERTa's ``lm_head.bias``). A fine-tune that adds tokens adds rows to exactly these.
_VOCAB_NAME = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|token_embedding|shared)\.weight$"
                         r"|(?:^|\.)lm_head\.(?:weight|bias|decoder\.weight|decoder\.bias)$"
                         r"|(?:^|\.)cls\.predictions\.(?:bias|decoder\.weight|decoder\.bias)$")


def is_vocab(name: str) -> bool:
    """Whether ``name`` has a row per token (embeddings, LM heads, an MLM decoder's bias), by name alone."""
    return _VOCAB_NAME.search(name) is not None


def is_embedding(name: str) -> bool:
    """Whether ``name`` is an embedding-like table (token, position, token type, shared), by name alone."""
    return _EMBEDDING_NAME.search(name) is not None


def is_norm_or_bias(name: str) -> bool:
    """Whether ``name`` is a bias or a norm weight (``norm`` in any case, or GPT-2's ``ln_*``), by name alone."""
    return _NORM_NAME.search(name) is not None or _BIAS_NAME.search(name) is not None


def is_parameter(name: str) -> bool:
    """Whether ``name`` is named like a trainable parameter (``.weight``/``.bias``) rather than a buffer."""
    return name.endswith(PARAMETER_SUFFIXES)


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
    """One architecture family: where its layers are and how they are stored."""

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
    # Output tensors tied to an input tensor when the config's ``tie_word_embeddings`` (default: ``ties_default``)
    # is true: the model holds one matrix and ``save_pretrained`` stores only the input (as transformers'
    # ``_tied_weights_keys`` of the family's task-head classes).
    ties: Mapping[str, str] = field(default_factory=dict)
    ties_default: bool = False


def _rotary_decoder(name: str, label: str, model_types: tuple[str, ...], **extra: Any) -> Family:
    """The Llama layout shared by Mistral, Qwen2 and Qwen3: separate projections, rotate_half RoPE, GQA."""
    return Family(name=name, label=label, model_types=model_types, towers=(Tower("", "layers.{i}."),),
                  prefixes=("", "model."), q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                  o="self_attn.o_proj", up="mlp.up_proj", gate="mlp.gate_proj", down="mlp.down_proj",
                  rotary=ROTARY_HALF, ties={"lm_head.weight": "model.embed_tokens.weight"}, **extra)


FAMILIES: tuple[Family, ...] = (
    Family(name="bert", label="BERT", model_types=("bert",), towers=(Tower("", "encoder.layer.{i}."),),
           prefixes=("", "bert."), q="attention.self.query", k="attention.self.key", v="attention.self.value",
           o="attention.output.dense", up="intermediate.dense", down="output.dense",
           qk_config_blockers={"position_embedding_type": ("relative_key", "relative_key_query")},
           ties={"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                 "cls.predictions.decoder.bias": "cls.predictions.bias"}, ties_default=True),
    Family(name="roberta", label="RoBERTa", model_types=("roberta",), towers=(Tower("", "encoder.layer.{i}."),),
           prefixes=("", "roberta."), q="attention.self.query", k="attention.self.key", v="attention.self.value",
           o="attention.output.dense", up="intermediate.dense", down="output.dense",
           qk_config_blockers={"position_embedding_type": ("relative_key", "relative_key_query")},
           ties={"lm_head.decoder.weight": "roberta.embeddings.word_embeddings.weight",
                 "lm_head.decoder.bias": "lm_head.bias"}, ties_default=True),
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
           up="mlp.c_fc", down="mlp.c_proj", layout=FUSED_CONV1D, heads_keys=("n_head", "num_attention_heads"),
           ties={"lm_head.weight": "transformer.wte.weight"}, ties_default=True),
    _rotary_decoder("llama", "Llama", ("llama",)),
    _rotary_decoder("mistral", "Mistral", ("mistral",)),
    _rotary_decoder("qwen2", "Qwen2", ("qwen2",)),
    _rotary_decoder("qwen3", "Qwen3", ("qwen3",), qk_norm=("self_attn.q_norm.weight", "self_attn.k_norm.weight")),
)


def supported() -> str:
    """The families of the table, for messages."""
    return ", ".join(f.label for f in FAMILIES)


def config_value(config: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    """The first of ``keys`` (dotted for nested dicts) that ``config`` sets, else None."""
    for key in keys:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            return node
    return None


def family_for(config: Mapping[str, Any] | None) -> Family | None:
    """The family of a model's config.json (its ``model_type``), or None when the table has none."""
    model_type = (config or {}).get("model_type")
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def stored_in_out(family: Family | None, name: str) -> bool:
    """Whether weight ``name`` is stored [in, out] (GPT-2's Conv1D layers), the transpose of an nn.Linear's."""
    return family is not None and family.layout == FUSED_CONV1D and bool(tensor_roles(name, family) & set(LAYER_ROLES))


def tied_weights(config: Mapping[str, Any] | None) -> Mapping[str, str]:
    """The tensors a model of this config ties to another (output -> input), none when it does not tie them:
    ``tie_word_embeddings`` if the config sets it (at the root or in ``text_config``), else its family's default."""
    family = family_for(config)
    if family is None or config is None:
        return {}
    tie = config_value(config, ("tie_word_embeddings", "text_config.tie_word_embeddings"))
    return family.ties if (family.ties_default if tie is None else tie is True) else {}


def towers_of(family: Family, config: Mapping[str, Any]) -> tuple[Tower, ...]:
    """The towers a model of this config has: one tower saved alone (without its prefix), or all of them."""
    alone = [t for t in family.towers if t.alone and t.alone == config.get("model_type")]
    return tuple(Tower(t.name, t.layer, t.config, t.inputs, "", t.alone) for t in alone) if alone else family.towers


def tower_config(config: Mapping[str, Any], tower: Tower) -> Mapping[str, Any]:
    """The (sub-)config holding ``tower``'s head counts."""
    sub = config.get(tower.config) if tower.config else None
    return sub if isinstance(sub, Mapping) else config


def layer_pattern(family: Family, tower: Tower, module: str, suffix: str = r"weight|bias") -> re.Pattern[str]:
    """Full tensor names of ``module`` (layer-relative) in every layer of ``tower``: groups ``p`` (the prefix up to
    the layer), ``i`` (the layer index) and ``suffix``."""
    prefixes = "|".join(re.escape(p + tower.prefix) for p in family.prefixes)
    layer = re.escape(tower.layer).replace(re.escape("{i}"), r"(?P<i>\d+)")
    return re.compile(rf"^(?P<p>{prefixes}){layer}{re.escape(module)}\.(?P<suffix>{suffix})$")


def layer_roles(family: Family) -> tuple[Role, ...]:
    """The layer roles ``family`` has (GATE only for gated MLPs)."""
    return tuple(r for r in LAYER_ROLES if getattr(family, r.value) is not None)


def _layer_rules(family: Family) -> list[tuple[Role, re.Pattern[str]]]:
    """Each layer role's pattern in each tower, also as saved alone (a CLIP text model without ``text_model.``)."""
    alone = tuple(a for t in family.towers if t.alone for a in towers_of(family, {"model_type": t.alone}))
    return [(role, layer_pattern(family, tower, getattr(family, role.value)))
            for tower in family.towers + alone for role in layer_roles(family)]


_LAYER_RULES = {family.name: _layer_rules(family) for family in FAMILIES}


def tensor_roles(name: str, family: Family | None = None) -> frozenset[Role]:
    """Every role of tensor ``name``: the name rules, plus the layer roles of ``family`` (of any family in the table
    when None). GPT-2's fused ``c_attn`` is q, k and v at once; BERT's ``embeddings.LayerNorm`` is an embedding and
    a norm."""
    roles = {role for role, rule in ((Role.EMBEDDING, _EMBEDDING_NAME), (Role.NORM, _NORM_NAME),
                                     (Role.BIAS, _BIAS_NAME)) if rule.search(name)}
    for rules in [_LAYER_RULES[family.name]] if family is not None else _LAYER_RULES.values():
        roles |= {role for role, pattern in rules if pattern.match(name)}
    return frozenset(roles)


@dataclass(frozen=True)
class TiedHead:
    """An output head that shares an input tensor's matrix and is not saved (``tie_word_embeddings``)."""

    embedding: str  # the input tensor holding the matrix
    head: str  # the head's module


def tied_head(config: Mapping[str, Any], tensors: Mapping[str, Any]) -> TiedHead | None:
    """The head tied to the token embedding in a model of this config with these tensors (the family's ``ties``):
    the config ties them, the model has the input tensor under the task model's name, and not the head's own weight
    (a base model without the head names its input without the task prefix)."""
    for output, source in tied_weights(config).items():
        if output.endswith(".weight") and source in tensors and output not in tensors:
            return TiedHead(source, output.removesuffix(".weight"))
    return None
