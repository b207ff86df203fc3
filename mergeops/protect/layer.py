"""One layer's tensors as MergeLock sees them: which axis of which stored tensor each map acts on, and the layer
in a common float64 form for the checks.

Stored layouts differ (``nn.Linear`` ``[out, in]``, GPT-2's transposed ``Conv1D`` with fused q|k|v), but every
map of :class:`~mergeops.protect.transforms.LayerTransform` acts on exactly one axis of a stored tensor, so a
tensor is transformed on its own, exactly, in its own dtype. For the checks a layer is loaded as ``nn.Linear``
weights in float64: ``q`` [H·d, in], ``k`` and ``v`` [G·d, in], ``o`` [out, H·d], ``up``/``gate`` [F, in],
``down`` [out, F], and the biases of q/k/v/up/gate when present.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mergeops.model.architectures import FUSED_CONV1D
from mergeops.protect.architectures import LayerUnit
from mergeops.protect.transforms import LayerTransform, Monomial

F64 = torch.float64


@dataclass(frozen=True)
class TensorMap:
    """``monomial`` acting on ``axis`` of the stored tensor ``name``."""

    name: str
    axis: int
    monomial: Monomial


def tensor_maps(unit: LayerUnit, t: LayerTransform) -> list[TensorMap]:
    """Every stored tensor of ``unit`` that ``t`` changes, with its axis and map."""
    names = unit.names
    maps: list[TensorMap] = []

    def add(role: str, axis: int, monomial: Monomial | None) -> None:
        if monomial is not None and role in names:
            maps.append(TensorMap(names[role], axis, monomial))

    if unit.family.layout == FUSED_CONV1D:  # Conv1D stores [in, out]: outputs are columns
        q = t.q or Monomial.identity(len(t.v) * unit.group_size)
        k = t.k or Monomial.identity(len(t.v))
        fused = Monomial.concat([q, k, t.v])
        add("q", 1, fused)
        add("q_bias", 0, fused)
        add("o", 0, t.o)
        add("up", 1, t.up)
        add("up_bias", 0, t.up)
        add("down", 0, t.down)
        return maps
    for role, monomial in (("q", t.q), ("k", t.k), ("v", t.v), ("up", t.up), ("gate", t.gate)):
        add(role, 0, monomial)
        add(f"{role}_bias", 0, monomial)
    add("o", 1, t.o)
    add("down", 1, t.down)
    return maps


def inverse_maps(maps: list[TensorMap]) -> list[TensorMap]:
    return [TensorMap(m.name, m.axis, m.monomial.inverse()) for m in maps]


@dataclass(frozen=True)
class LayerWeights:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate: torch.Tensor | None = None
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None

    def role(self, name: str) -> torch.Tensor | None:
        return getattr(self, name)


def load(unit: LayerUnit, read: Callable[[str], torch.Tensor]) -> LayerWeights:
    """The layer's weights as float64 ``nn.Linear`` tensors."""
    names = unit.names

    def get(role: str) -> torch.Tensor | None:
        return read(names[role]).to(F64) if role in names else None

    if unit.family.layout == FUSED_CONV1D:
        q, k, v = get("q").T.chunk(3, dim=0)  # type: ignore[union-attr]  # Conv1D [in, 3E] -> [3E, in]
        biases = get("q_bias").chunk(3) if "q_bias" in names else (None, None, None)  # type: ignore[union-attr]
        return LayerWeights(q, k, v, get("o").T, get("up").T, get("down").T,  # type: ignore[union-attr]
                            None, *biases, get("up_bias"), None)
    return LayerWeights(*(get(r) for r in ("q", "k", "v", "o", "up", "down", "gate", "q_bias", "k_bias", "v_bias",
                                           "up_bias", "gate_bias")))  # type: ignore[arg-type]
