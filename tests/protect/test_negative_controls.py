"""The symmetries are exactly what MergeLock uses and no more: every near miss breaks the model.

Maps are applied here by hand to the saved weights (an implementation independent of the protect pipeline: a
gather and a multiplication per tensor), with maps from mergeops.protect.transforms. A positive control in the
same harness shows that the harness preserves the function when the maps are right.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from mergeops.model import ModelFolder
from mergeops.protect.architectures import resolve
from mergeops.protect.checks import invariant_errors
from mergeops.protect.layer import load, tensor_maps
from mergeops.protect.transforms import KeyStream, Monomial, layer_transform, signed_permutation
from tests.protect.conftest import (
    ARCHITECTURES,
    KEY,
    build_model,
    copy_with_weights,
    inputs_for,
    max_rel_error,
    outputs,
    save,
)

BROKEN = 1e-2  # a broken model is at least this far off (1000× the float32 tolerance)
SALT = bytes(16)


def by_hand(weights: dict[str, torch.Tensor], maps) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    out = dict(weights)
    for name, axis, m in maps:
        shape = [1] * out[name].dim()
        shape[axis] = -1
        out[name] = out[name].double().index_select(axis, m.perm).mul(m.coef.reshape(shape)).to(out[name].dtype)
    return out


def error_after(name: str, tmp_path, change) -> float:  # type: ignore[no-untyped-def]
    """Max relative output error of the model after ``change(units, transforms)`` picks the maps to apply."""
    source = save(build_model(name, init=0.2), tmp_path / "source")
    with ModelFolder.open(source) as folder:
        units = resolve(folder).units
    transforms = [layer_transform(KEY, SALT, u, 4) for u in units]
    maps = change(units, transforms)
    changed = copy_with_weights(source, tmp_path / "changed", by_hand(load_file(source / "model.safetensors"), maps))
    inputs = inputs_for(name)
    model_cls = ARCHITECTURES[name][1]
    return max_rel_error(outputs(model_cls, source, inputs), outputs(model_cls, changed, inputs))


def all_maps(units, transforms):  # type: ignore[no-untyped-def]
    return [(m.name, m.axis, m.monomial) for u, t in zip(units, transforms, strict=True) for m in tensor_maps(u, t)]


@pytest.mark.parametrize("name", ["llama-gqa", "bert", "gpt2-lm"])
def test_control_the_maps_applied_by_hand_preserve_the_function(name, tmp_path):
    assert error_after(name, tmp_path, all_maps) <= 1e-5


def test_a_signed_permutation_across_rotary_pairs_breaks_rope(tmp_path):
    def across_pairs(units, transforms):  # type: ignore[no-untyped-def]
        wrong = []
        for u in units:
            d = u.head_dim
            perm = signed_permutation(KeyStream(bytes(32)), d, 0)  # mixes dimensions of different frequencies
            q = Monomial.concat([perm] * u.heads)
            k = Monomial.concat([perm] * u.kv_heads)
            wrong += [(u.names["q"], 0, q), (u.names["k"], 0, k)]
        return wrong

    assert error_after("llama-gqa", tmp_path, across_pairs) >= BROKEN


def test_quarter_turns_on_adjacent_pairs_break_hugging_face_rope(tmp_path):
    def adjacent(units, transforms):  # type: ignore[no-untyped-def]
        wrong = []
        for u in units:
            adjacent_unit = replace(u, family=replace(u.family, rotary="adjacent"))  # GPT-J / Meta layout, not HF's
            t = layer_transform(KEY, SALT, adjacent_unit, 0)
            wrong += [(m.name, m.axis, m.monomial) for m in tensor_maps(u, t) if m.name in (u.names["q"],
                                                                                             u.names["k"])]
        return wrong

    assert error_after("llama-gqa", tmp_path, adjacent) >= BROKEN


def test_query_heads_of_one_group_must_share_its_map(tmp_path):
    def own_map_for_one_head(units, transforms):  # type: ignore[no-untyped-def]
        maps = all_maps(units, transforms)
        u, t = units[0], transforms[0]
        d = u.head_dim
        perm, coef = t.q.perm.clone(), t.q.coef.clone()
        coef[d:2 * d] = coef[d:2 * d] * 2  # query head 1 (group 0) scaled differently from its key
        return [(n, a, Monomial(perm, coef) if n == u.names["q"] else m) for n, a, m in maps]

    assert error_after("llama-gqa", tmp_path, own_map_for_one_head) >= BROKEN


def test_heads_must_move_together_in_queries_keys_values_and_outputs(tmp_path):
    def values_left_in_place(units, transforms):  # type: ignore[no-untyped-def]
        return [(n, a, m) for n, a, m in all_maps(units, transforms)
                if n not in {u.names["v"] for u in units} | {u.names["o"] for u in units}]

    assert error_after("bert", tmp_path, values_left_in_place) >= BROKEN


def test_mlp_neurons_must_move_in_up_and_down_alike_and_only_gated_mlps_may_scale(tmp_path):
    def up_only(units, transforms):  # type: ignore[no-untyped-def]
        return [(u.names["up"], 0, t.up) for u, t in zip(units, transforms, strict=True)]

    assert error_after("bert", tmp_path / "a", up_only) >= BROKEN

    def scaled_gelu(units, transforms):  # type: ignore[no-untyped-def]
        scaled = []
        for u, t in zip(units, transforms, strict=True):
            up = Monomial(t.up.perm, torch.full_like(t.up.coef, 16.0))  # GELU(16x) ≠ 16·GELU(x)
            scaled += [(u.names["up"], 0, up), (u.names["up_bias"], 0, up), (u.names["down"], 1, up.reciprocal())]
        return scaled

    assert error_after("bert", tmp_path / "b", scaled_gelu) >= BROKEN
    assert error_after("llama-gqa", tmp_path / "c", all_maps) <= 1e-5  # SwiGLU: up rows scale, down undoes it


def test_the_invariants_catch_a_wrong_head_order(model_dir):
    with ModelFolder.open(model_dir("bert")) as folder:
        unit = resolve(folder).units[0]
        original = load(unit, folder.read)
        t = layer_transform(KEY, SALT, unit, 4)
        weights = {n: folder.read(n) for n in unit.tensor_names}
    protected = by_hand(weights, [(m.name, m.axis, m.monomial) for m in tensor_maps(unit, t)])
    prot = load(unit, protected.__getitem__)
    assert max(invariant_errors(unit, original, prot, t.head_order).values()) <= 1e-12
    wrong = torch.roll(t.head_order, 1)
    errors = invariant_errors(unit, original, prot, wrong)
    assert errors["qk"] >= 0.1 and errors["vo"] >= 0.1
