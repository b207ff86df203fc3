"""The architecture table classifies the tensors of real transformers models exactly as each consumer's own rule
did before the table existed: OPCM's default projection, intake's float check, the curvature import's
no-decay split (by name, and the Trainer's rule on a model), and MergeLock's layer units.

The old rules are written out below as they were; real BERT, GPT-2, Llama and CLIP models (and every other
architecture tests/protect builds) are built offline from tiny configs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from mergeops.fold.methods.opcm import OPCM
from mergeops.intake.curvature import _decay_parameter_names, _layout_from_names, _layouts_from_config
from mergeops.intake.validate import tensor_value_problem
from mergeops.model import ModelFolder
from mergeops.model.architectures import (
    LAYER_ROLES,
    TRAINER_NO_DECAY,
    Role,
    family_for,
    is_embedding,
    is_norm_or_bias,
    is_parameter,
    tensor_roles,
)
from mergeops.protect.architectures import resolve
from tests.protect.conftest import ARCHITECTURES, build_model, save

# -- the rules as each consumer wrote them before the table -----------------------------------------------------
OLD_OPCM_NOT_LINEAR = re.compile(r"embed|wte|wpe|position|token_type|shared")
OLD_VALIDATE_PARAMETER_SUFFIXES = (".weight", ".bias")
OLD_CURVATURE_NAME_NO_DECAY = re.compile(r"bias|norm|(?:^|\.)ln_", re.IGNORECASE)
OLD_TRAINER_NO_DECAY = tuple(re.compile(p) for p in (
    r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"))

PINNED = ("bert", "gpt2-lm", "llama-gqa", "clip")


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {name: build_model(name) for name in ARCHITECTURES}


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every tensor name the model has, buffers and tied weights included."""
    return {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_opcm_projects_the_same_tensors(models, arch):
    opcm = OPCM(OPCM.check_params({}, "test"), {})
    for name, shape in shapes(models[arch]).items():
        old = len(shape) == 2 and name.endswith(".weight") and not OLD_OPCM_NOT_LINEAR.search(name)
        assert opcm.is_projected(name, shape) == old, name


def test_opcm_default_rule_on_known_tensors(models):
    opcm = OPCM(OPCM.check_params({}, "test"), {})
    projected = {arch: {n for n, s in shapes(models[arch]).items() if opcm.is_projected(n, s)} for arch in PINNED}
    assert "encoder.layer.0.attention.self.query.weight" in projected["bert"]
    assert "embeddings.word_embeddings.weight" not in projected["bert"]
    assert "embeddings.token_type_embeddings.weight" not in projected["bert"]
    assert {"transformer.h.0.attn.c_attn.weight", "lm_head.weight"} <= projected["gpt2-lm"]
    assert not {"transformer.wte.weight", "transformer.wpe.weight"} & projected["gpt2-lm"]
    assert {"model.layers.0.mlp.gate_proj.weight", "lm_head.weight"} <= projected["llama-gqa"]
    assert "model.embed_tokens.weight" not in projected["llama-gqa"]
    assert "vision_model.embeddings.patch_embedding.weight" not in projected["clip"]
    assert "text_model.embeddings.position_embedding.weight" not in projected["clip"]
    assert "visual_projection.weight" in projected["clip"]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_validation_expects_floats_where_it_did(models, arch):
    integer = torch.zeros(2, dtype=torch.int64)
    for name in shapes(models[arch]):
        old = name.endswith(OLD_VALIDATE_PARAMETER_SUFFIXES)
        problem = tensor_value_problem(name, integer)
        assert (problem is not None and problem.code == "not_floating") == old, name


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_curvature_name_rule_splits_the_same_parameters(models, arch):
    params = dict(models[arch].named_parameters())
    stored = {n: tuple(p.shape) for n, p in params.items()}
    layout = _layout_from_names(Path("checkpoint"), list(params), stored)
    assert [p.name for p in layout.no_decay] == [n for n in params if OLD_CURVATURE_NAME_NO_DECAY.search(n)]
    assert [p.name for p in layout.decay] == [n for n in params if not OLD_CURVATURE_NAME_NO_DECAY.search(n)]


def reference_decay_names(model: nn.Module, patterns: tuple[re.Pattern[str], ...]) -> set[str]:
    """transformers' get_parameter_names(model, [nn.LayerNorm], patterns), written out independently."""
    names = set()
    for module_name, module in model.named_modules():
        if any(isinstance(m, nn.LayerNorm) for m in _ancestors(model, module_name)):
            continue
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if not any(p.search(full.lower()) for p in patterns):
                names.add(full)
    return names


def _ancestors(model: nn.Module, module_name: str) -> list[nn.Module]:
    parts = module_name.split(".") if module_name else []
    found, node = [], model
    for part in parts:
        node = getattr(node, part)
        found.append(node)
    return found


@pytest.mark.parametrize("arch", PINNED)
def test_trainer_rules_split_the_same_parameters(models, arch, tmp_path):
    model = models[arch]
    assert set(_decay_parameter_names(model, OLD_TRAINER_NO_DECAY)) == reference_decay_names(model,
                                                                                             OLD_TRAINER_NO_DECAY)
    folder = save(model, tmp_path / arch)
    stored = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    current, legacy = _layouts_from_config(folder, stored)
    unique = dict(model.named_parameters())
    assert {p.name for p in current.decay} == reference_decay_names(model, OLD_TRAINER_NO_DECAY) & unique.keys()
    assert {p.name for p in legacy.decay} == {n for n in reference_decay_names(model, ()) if "bias" not in n} \
        & unique.keys()


# -- the table's own functions agree with the old rules and with MergeLock ----------------------------------------
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_name_rules_are_the_old_rules(models, arch):
    for name in shapes(models[arch]):
        assert is_embedding(name) == bool(OLD_OPCM_NOT_LINEAR.search(name)), name
        assert is_norm_or_bias(name) == bool(OLD_CURVATURE_NAME_NO_DECAY.search(name)), name
        assert is_parameter(name) == name.endswith(OLD_VALIDATE_PARAMETER_SUFFIXES), name
        roles = tensor_roles(name)
        assert (Role.EMBEDDING in roles) == is_embedding(name), name
        assert bool({Role.NORM, Role.BIAS} & roles) == is_norm_or_bias(name), name
    assert [p.pattern for p in TRAINER_NO_DECAY] == [p.pattern for p in OLD_TRAINER_NO_DECAY]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_layer_roles_are_the_tensors_mergelock_protects(models, arch, tmp_path):
    folder = ModelFolder.open(save(models[arch], tmp_path / arch))
    family = family_for(folder.config)
    plan = resolve(folder)
    protected: dict[str, set[Role]] = {}
    for unit in plan.units:
        for key, name in unit.names.items():
            protected.setdefault(name, set()).add(Role(key.removesuffix("_bias")))
    for name in folder.tensors:
        layer = tensor_roles(name, family) & set(LAYER_ROLES)
        assert layer == tensor_roles(name) & set(LAYER_ROLES), name  # the family is the only one naming it so
        if name.endswith(".weight") or name in protected:
            assert layer == protected.get(name, set()), name


def test_roles_of_known_tensors():
    assert tensor_roles("transformer.h.0.attn.c_attn.weight") == {Role.Q, Role.K, Role.V}
    assert tensor_roles("h.3.mlp.c_proj.bias") == {Role.DOWN, Role.BIAS}
    assert tensor_roles("encoder.layer.0.attention.output.dense.weight") == {Role.O}
    assert tensor_roles("bert.encoder.layer.0.output.dense.weight") == {Role.DOWN}
    assert tensor_roles("model.layers.1.mlp.gate_proj.weight") == {Role.GATE}
    assert tensor_roles("vision_model.encoder.layers.0.self_attn.out_proj.weight") == {Role.O}
    assert tensor_roles("encoder.layers.0.mlp.fc1.weight") == {Role.UP}  # a CLIP tower saved alone
    assert tensor_roles("bert.embeddings.LayerNorm.weight") == {Role.EMBEDDING, Role.NORM}
    assert tensor_roles("model.norm.weight") == {Role.NORM}
    assert tensor_roles("classifier.weight") == frozenset()


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_buffer_of_a_real_model_is_a_buffer_and_no_parameter_is(models, arch):
    """What a checkpoint may leave out and have taken from the base: the model's buffers, never its parameters."""
    from mergeops.model.architectures import is_buffer

    model = models[arch]
    assert all(is_buffer(name) for name, _ in model.named_buffers())
    assert not any(is_buffer(name) for name, _ in model.named_parameters())


ODD_VOCAB = 97  # no other dimension of the test models has this size


def _with_odd_vocab(arch: str) -> nn.Module:
    import transformers

    config_cls, model_cls, kwargs = ARCHITECTURES[arch]
    kwargs = {k: ({**v, "vocab_size": ODD_VOCAB} if k == "text_config" else v) for k, v in kwargs.items()}
    if "vocab_size" in kwargs:
        kwargs["vocab_size"] = ODD_VOCAB
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_the_tensors_with_a_row_per_token_are_those_sized_by_the_vocabulary(arch):
    """What a fine-tune that adds tokens resizes: every tensor whose first dimension is the vocabulary's size
    (embeddings, heads, BERT's and RoBERTa's decoder biases), and no other."""
    from mergeops.model.architectures import is_vocab

    tensors = shapes(_with_odd_vocab(arch))
    assert {n for n in tensors if is_vocab(n)} == {n for n, shape in tensors.items() if shape[:1] == (ODD_VOCAB,)}


@pytest.mark.parametrize(("config", "head"), [
    ("LlamaConfig", "LlamaForCausalLM"), ("MistralConfig", "MistralForCausalLM"), ("Qwen2Config", "Qwen2ForCausalLM"),
    ("Qwen3Config", "Qwen3ForCausalLM"), ("GPT2Config", "GPT2LMHeadModel"), ("BertConfig", "BertForMaskedLM"),
    ("RobertaConfig", "RobertaForMaskedLM"),
])
def test_each_familys_ties_and_their_default_are_transformers(config, head):
    """The table's ties are the task-head class's ``_tied_weights_keys``, its default the config class's
    ``tie_word_embeddings``; :func:`tied_weights` follows a config that says otherwise."""
    import transformers

    from mergeops.model.architectures import tied_weights

    config_class, head_class = getattr(transformers, config), getattr(transformers, head)
    family = family_for({"model_type": config_class.model_type})
    assert dict(family.ties) == head_class._tied_weights_keys
    assert family.ties_default is config_class().tie_word_embeddings
    model_type = {"model_type": config_class.model_type}
    assert tied_weights(model_type) == (family.ties if family.ties_default else {})
    assert tied_weights(model_type | {"tie_word_embeddings": not family.ties_default}) == (
        {} if family.ties_default else family.ties)
