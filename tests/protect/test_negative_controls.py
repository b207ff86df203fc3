"""The symmetry is exactly per head (per key/value group), and under RoPE exactly a scaled rotation on the
Hugging Face pairs (i, i + d/2): every near miss breaks the model.

The transforms here are applied by hand to a live transformers model's state dict (an implementation
independent of mergeops.protect.heads), with matrices from mergeops.protect.matrices. A positive control in
the same harness shows the harness itself preserves the function when the matrices are right.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mergeops.protect.matrices import KeyStream, general_block, rotary_block
from tests.protect.conftest import build_model, inputs_for, max_rel_error, run

BROKEN = 1e-2  # a broken model is at least this far off (1000× the float32 tolerance)


def stream(tag: str) -> KeyStream:
    return KeyStream(bytes(32 - len(tag)) + tag.encode())


def apply(model: torch.nn.Module, proj: dict[str, str], layers: int, heads: int, kv_heads: int, d: int,
          qk: dict | None = None, vo: dict | None = None, q_per_head: dict | None = None) -> torch.nn.Module:
    """A copy of ``model`` with, in each layer, Wq[h] ← A_hᵀ Wq[h], Wk[g] ← A_g⁻¹ Wk[g] (``qk[(layer, g)]``,
    ``q_per_head[(layer, h)]`` overriding a query head's A), Wv[g] ← B_gᵀ Wv[g], Wo[:, h] ← Wo[:, h] B_g⁻ᵀ;
    a key (layer, "all") applies one full-width matrix across all heads instead. ``proj`` names the q/k/v/o
    weights with ``{i}`` for the layer."""
    state = {k: v.double() for k, v in model.state_dict().items()}
    n = heads // kv_heads

    def left(name: str, rows: slice, m: torch.Tensor) -> None:  # a projection's rows and its bias, if any
        for t in (name, name.removesuffix("weight") + "bias"):
            if t in state:
                state[t][rows] = m @ state[t][rows]

    for i in range(layers):
        q, k, v, o = (proj[r].format(i=i) for r in "qkvo")
        everything = slice(None)
        if qk and (i, "all") in qk:
            left(q, everything, qk[(i, "all")].m.T)
            left(k, everything, qk[(i, "all")].inv)
        elif qk:
            for g in range(kv_heads):
                left(k, slice(g * d, (g + 1) * d), qk[(i, g)].inv)
                for h in range(g * n, (g + 1) * n):
                    left(q, slice(h * d, (h + 1) * d), (q_per_head or {}).get((i, h), qk[(i, g)]).m.T)
        if vo and (i, "all") in vo:
            left(v, everything, vo[(i, "all")].m.T)
            state[o] = state[o] @ vo[(i, "all")].inv.T
        elif vo:
            for g in range(kv_heads):
                left(v, slice(g * d, (g + 1) * d), vo[(i, g)].m.T)
                for h in range(g * n, (g + 1) * n):
                    state[o][:, h * d:(h + 1) * d] = state[o][:, h * d:(h + 1) * d] @ vo[(i, g)].inv.T
    changed = copy.deepcopy(model)
    changed.load_state_dict({k: v.float() for k, v in state.items()})
    return changed


def error(model: torch.nn.Module, changed: torch.nn.Module, name: str) -> float:
    inputs = inputs_for(name)
    return max_rel_error(run(model, inputs), run(changed, inputs))


# -- Llama (RoPE, grouped-query attention: 4 query heads, 2 key/value heads, head_dim 16) -----------------------
LLAMA = "llama-gqa"
LLAMA_PROJ = {r: f"model.layers.{{i}}.self_attn.{r}_proj.weight" for r in "qkvo"}


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return build_model(LLAMA, init=0.2)


def llama_blocks(make) -> dict:
    return {(i, g): make(stream(f"{i}{g}")) for i in range(2) for g in range(2)}


def test_control_scaled_rotations_on_half_pairs_shared_per_group_preserve_the_function(llama):
    qk = llama_blocks(lambda s: rotary_block(s, 16, 16, "half"))
    vo = llama_blocks(lambda s: general_block(s, 16))
    assert error(llama, apply(llama, LLAMA_PROJ, 2, 4, 2, 16, qk=qk, vo=vo), LLAMA) <= 1e-5


def test_a_general_invertible_matrix_on_queries_and_keys_breaks_rope(llama):
    qk = llama_blocks(lambda s: general_block(s, 16))  # fine without RoPE, wrong with it
    assert error(llama, apply(llama, LLAMA_PROJ, 2, 4, 2, 16, qk=qk), LLAMA) >= BROKEN


def test_rotations_on_adjacent_pairs_break_hugging_face_rope(llama):
    qk = llama_blocks(lambda s: rotary_block(s, 16, 16, "adjacent"))  # GPT-J / Meta layout, not HF's
    assert error(llama, apply(llama, LLAMA_PROJ, 2, 4, 2, 16, qk=qk), LLAMA) >= BROKEN


def test_query_heads_of_one_group_must_share_its_matrix(llama):
    qk = llama_blocks(lambda s: rotary_block(s, 16, 16, "half"))
    own = {(0, 1): rotary_block(stream("own"), 16, 16, "half")}  # query head 1 (group 0) gets its own A
    assert error(llama, apply(llama, LLAMA_PROJ, 2, 4, 2, 16, qk=qk, q_per_head=own), LLAMA) >= BROKEN


# -- BERT (no RoPE: any invertible A per head works, but only per head) -----------------------------------------
BERT = "bert"
BERT_PROJ = {"q": "encoder.layer.{i}.attention.self.query.weight", "k": "encoder.layer.{i}.attention.self.key.weight",
             "v": "encoder.layer.{i}.attention.self.value.weight",
             "o": "encoder.layer.{i}.attention.output.dense.weight"}


@pytest.fixture(scope="module")
def bert() -> torch.nn.Module:
    return build_model(BERT, init=0.2)


def bert_blocks(d: int, per_head: bool) -> dict:
    if per_head:
        return {(i, h): general_block(stream(f"b{i}{h}"), d) for i in range(2) for h in range(4)}
    return {(i, "all"): general_block(stream(f"b{i}"), d) for i in range(2)}


def test_control_general_matrices_per_head_preserve_bert(bert):
    qk, vo = bert_blocks(16, per_head=True), bert_blocks(16, per_head=True)
    assert error(bert, apply(bert, BERT_PROJ, 2, 4, 4, 16, qk=qk, vo=vo), BERT) <= 1e-5


def test_a_query_key_matrix_that_mixes_heads_breaks_the_model(bert):
    # q·k summed over all heads is unchanged, but each head's softmax sees other heads' logits.
    assert error(bert, apply(bert, BERT_PROJ, 2, 4, 4, 16, qk=bert_blocks(64, per_head=False)), BERT) >= BROKEN


def test_a_value_output_matrix_that_mixes_heads_breaks_the_model(bert):
    # Wo·Wv over all heads is unchanged, but each head's values are weighted by its own attention.
    assert error(bert, apply(bert, BERT_PROJ, 2, 4, 4, 16, vo=bert_blocks(64, per_head=False)), BERT) >= BROKEN


@pytest.mark.parametrize(("pairing", "rotary_dim"), [("half", 16), ("half", 8), ("adjacent", 16)])
def test_rotary_blocks_commute_with_every_rope_rotation_of_their_layout(pairing, rotary_dim):
    from mergeops.protect.matrices import rotary_pairs

    d = 16
    a = rotary_block(stream(f"rot{pairing}{rotary_dim}"), d, rotary_dim, pairing)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    for position in (1, 7, 300):
        rope = torch.eye(d, dtype=torch.float64)  # RoPE at a relative position, on this layout's pairs
        for j, (x, y) in enumerate(rotary_pairs(rotary_dim, pairing)):
            theta = position * 10000 ** (-2 * j / rotary_dim)
            rope[x, x], rope[x, y], rope[y, x], rope[y, y] = math.cos(theta), -math.sin(theta), math.sin(theta), \
                math.cos(theta)
        logit = q @ rope @ k
        assert torch.isclose((a.m.T @ q) @ rope @ (a.inv @ k), logit, rtol=1e-10, atol=1e-12)
