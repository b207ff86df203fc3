"""One attention layer's weights in a common form, and the per-head transform of MergeLock (SPEC §8).

Whatever the storage layout, a layer is handled as PyTorch ``nn.Linear`` weights in float64: ``q``
[H·d, in], ``k`` and ``v`` [G·d, in] (G key/value heads, H = G·n query heads), ``o`` [out, H·d], and the
q/k/v biases when present. Query head h belongs to key/value group h // n, as in Hugging Face's
``repeat_kv``. For group g with matrices A_g and B_g the transform is

    Wq[h] ← A_gᵀ Wq[h],  Wk[g] ← A_g⁻¹ Wk[g],  Wv[g] ← B_gᵀ Wv[g],  Wo[:, h] ← Wo[:, h] B_g⁻ᵀ,

biases transforming like their outputs and the output bias untouched. Every attention logit
q_hᵀ k_g = (Aᵀq)ᵀ(A⁻¹k) and every head output Wo[:,h]·v are unchanged. Applying it with A⁻¹, B⁻¹
in place of A, B undoes it exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch

from mergeops.protect.architectures import FUSED_CONV1D, AttentionUnit
from mergeops.protect.matrices import Invertible

F64 = torch.float64


@dataclass(frozen=True)
class HeadWeights:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None

    def role(self, name: str) -> torch.Tensor | None:
        return getattr(self, name)


def load(unit: AttentionUnit, read: Callable[[str], torch.Tensor]) -> HeadWeights:
    """The layer's attention weights as float64 ``nn.Linear`` tensors."""
    names = unit.names
    if unit.family.layout == FUSED_CONV1D:
        fused = read(names["q"]).to(F64).T  # Conv1D [in, 3E] -> [3E, in]
        q, k, v = fused.chunk(3, dim=0)
        biases = read(names["q_bias"]).to(F64).chunk(3) if "q_bias" in names else (None, None, None)
        return HeadWeights(q, k, v, read(names["o"]).to(F64).T, *biases)
    return HeadWeights(*(read(names[r]).to(F64) for r in ("q", "k", "v", "o")),
                       *(read(names[r]).to(F64) if r in names else None for r in ("q_bias", "k_bias", "v_bias")))


def store(unit: AttentionUnit, w: HeadWeights, dtypes: Mapping[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """The layer's tensors by name in their storage layout, each cast once to its stored dtype."""
    names = unit.names
    if unit.family.layout == FUSED_CONV1D:
        out = {names["q"]: torch.cat([w.q, w.k, w.v], dim=0).T, names["o"]: w.o.T}
        if "q_bias" in names:
            assert w.q_bias is not None and w.k_bias is not None and w.v_bias is not None
            out[names["q_bias"]] = torch.cat([w.q_bias, w.k_bias, w.v_bias])
    else:
        out = {names[r]: w.role(r) for r in names}  # type: ignore[misc]
    return {name: tensor.to(dtypes[name]).contiguous() for name, tensor in out.items()}


def transform(unit: AttentionUnit, w: HeadWeights, qk: list[Invertible] | None, vo: list[Invertible],
              inverse: bool = False) -> HeadWeights:
    """Apply the per-group matrices (``qk``: A_g or None to leave Q/K alone; ``vo``: B_g); ``inverse`` undoes."""
    d, n, heads = unit.head_dim, unit.group_size, unit.heads

    def pick(block: Invertible) -> tuple[torch.Tensor, torch.Tensor]:
        return (block.inv, block.m) if inverse else (block.m, block.inv)

    out = w
    if qk is not None:
        a, a_inv = zip(*(pick(b) for b in qk), strict=True)
        q_left = torch.stack([m.T for m in a]).repeat_interleave(n, dim=0)  # [H, d, d]
        k_left = torch.stack(list(a_inv))  # [G, d, d]
        out = replace(out, q=_left(q_left, w.q, heads, d), k=_left(k_left, w.k, unit.kv_heads, d),
                      q_bias=_left_bias(q_left, w.q_bias, heads, d),
                      k_bias=_left_bias(k_left, w.k_bias, unit.kv_heads, d))
    b, b_inv = zip(*(pick(blk) for blk in vo), strict=True)
    v_left = torch.stack([m.T for m in b])  # [G, d, d]
    o_right = torch.stack([m.T for m in b_inv]).repeat_interleave(n, dim=0)  # [H, d, d]
    o = torch.einsum("ohd,hde->ohe", w.o.reshape(w.o.shape[0], heads, d), o_right).reshape(w.o.shape)
    return replace(out, v=_left(v_left, w.v, unit.kv_heads, d), v_bias=_left_bias(v_left, w.v_bias, unit.kv_heads, d),
                   o=o)


def _left(mats: torch.Tensor, weight: torch.Tensor, heads: int, d: int) -> torch.Tensor:
    return torch.bmm(mats, weight.reshape(heads, d, -1)).reshape(weight.shape)


def _left_bias(mats: torch.Tensor, bias: torch.Tensor | None, heads: int, d: int) -> torch.Tensor | None:
    if bias is None:
        return None
    return torch.bmm(mats, bias.reshape(heads, d, 1)).reshape(bias.shape)
