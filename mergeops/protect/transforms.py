"""The secret transforms of MergeLock, derived from the lock key (SPEC §8).

Every transform is a *monomial* map on one axis of a weight: entry i of the result is ``coef[i]`` times entry
``perm[i]`` of the input, where ``perm`` is a permutation and every ``coef`` is ±2^k. Such a map is exact in
floating point (a gather and a multiplication by a power of two), and so is its inverse, as long as no value
overflows or falls below the storage dtype's normal range (which :mod:`mergeops.protect.layer` checks).

Per layer, from the lock key (HKDF-SHA256, salt and info naming the scheme, layer, group and branch):

- the order of the key/value groups and of the query heads within each group (whole heads move together);
- per key/value group, a query/key map: a signed permutation of the head's dimensions scaled per dimension
  by 2^±strength, applied to the query rows with its reciprocal on the key rows (every logit q·k unchanged);
  under rotary embeddings, per frequency pair a rotation by a multiple of 90° scaled by 2^±strength, which
  commutes with every rotary position rotation;
- per key/value group, a value/output map: the same kind of map on the value rows, its reciprocal on the
  output projection's columns;
- a permutation of the MLP's hidden neurons (up/gate rows, down columns): exact for any elementwise
  activation; under a gated MLP (SwiGLU) also a per-neuron 2^±strength on up rows, reciprocal on down columns.

Numbers come from a ChaCha20 keystream keyed per block, defined byte for byte here (not by a library's random
number generator), so the owner can rebuild the same transforms with any later torch to unprotect.
"""

from __future__ import annotations

import hashlib
import hmac
import sys
from dataclasses import dataclass

import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mergeops.model.architectures import ROTARY_ADJACENT, ROTARY_HALF
from mergeops.protect.architectures import LayerUnit

SCHEME = "mergelock-v2"
SALT_BYTES = 16
_F64 = torch.float64


def block_key(lock_key: bytes, salt: bytes, info: str) -> bytes:
    """HKDF-SHA256 of the lock key for one block; ``info`` names it, e.g. ``layer=3|group=1|qk``."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt,
                info=f"{SCHEME}|{info}".encode()).derive(lock_key)


def check_tag(lock_key: bytes, salt: bytes) -> str:
    """The key-check tag stored with a protected model: HMAC-SHA256 of the salt under an HKDF-derived key.

    It tells the owner's key from any other without revealing anything about the key or the transforms."""
    return hmac.new(block_key(lock_key, salt, "check"), salt, hashlib.sha256).hexdigest()


def derived_salt(lock_key: bytes, source_digest: str) -> bytes:
    """The default salt: a function of the key and the input's digest, so protecting twice gives the same bytes."""
    return hmac.new(lock_key, f"{SCHEME}|salt|{source_digest}".encode(), hashlib.sha256).digest()[:SALT_BYTES]


class KeyStream:
    """Uniform numbers, permutations and signs from a ChaCha20 keystream (nonce 0; every block key is unique)."""

    def __init__(self, key: bytes) -> None:
        self._encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` numbers in (0, 1): the top 53 bits of each little-endian 64-bit word, plus half a step."""
        data = self._encryptor.update(bytes(8 * n))
        if sys.byteorder != "little":  # the stream is defined little-endian
            data = b"".join(data[i:i + 8][::-1] for i in range(0, len(data), 8))
        words = torch.frombuffer(bytearray(data), dtype=torch.int64) if n else torch.zeros(0, dtype=torch.int64)
        return (((words >> 11) & (2 ** 53 - 1)).to(_F64) + 0.5) * 2.0 ** -53

    def permutation(self, n: int) -> torch.Tensor:
        """A uniformly random permutation of ``range(n)`` (the order of ``n`` uniform numbers)."""
        return torch.argsort(self.uniform(n), stable=True)

    def signs(self, n: int) -> torch.Tensor:
        """``n`` random ±1.0."""
        return torch.where(self.uniform(n) < 0.5, -1.0, 1.0).to(_F64)


@dataclass(frozen=True)
class Monomial:
    """Entry i of the result is ``coef[i]`` times entry ``perm[i]`` of the input (along one axis)."""

    perm: torch.Tensor  # int64 [n], a permutation
    coef: torch.Tensor  # float64 [n], each ±2^k

    @classmethod
    def identity(cls, n: int) -> Monomial:
        return cls(torch.arange(n), torch.ones(n, dtype=_F64))

    def __len__(self) -> int:
        return int(self.perm.numel())

    def inverse(self) -> Monomial:
        back = torch.argsort(self.perm)
        return Monomial(back, 1.0 / self.coef[back])

    def reciprocal(self) -> Monomial:
        """What the other factor of a product gets: the same permutation, reciprocal coefficients."""
        return Monomial(self.perm, 1.0 / self.coef)

    def apply(self, tensor: torch.Tensor, axis: int) -> torch.Tensor:
        """``tensor`` transformed along ``axis``, computed exactly (float32 or wider) and cast back to its dtype."""
        work = torch.promote_types(tensor.dtype, torch.float32)
        shape = [1] * tensor.dim()
        shape[axis] = -1
        picked = tensor.index_select(axis, self.perm).to(work)
        return (picked * self.coef.to(work).reshape(shape)).to(tensor.dtype)

    @staticmethod
    def concat(parts: list[Monomial]) -> Monomial:
        """Block-diagonal: each part acts on its own consecutive slice."""
        offsets = [0]
        for part in parts:
            offsets.append(offsets[-1] + len(part))
        return Monomial(torch.cat([p.perm + o for p, o in zip(parts, offsets, strict=False)]),
                        torch.cat([p.coef for p in parts]))


def _scales(stream: KeyStream, n: int, strength: int) -> torch.Tensor:
    """Per entry ±2^±strength: a random sign and a random direction of the scaling."""
    return stream.signs(n) * torch.pow(2.0, stream.signs(n) * strength)


def rotary_pairs(rotary_dim: int, pairing: str) -> list[tuple[int, int]]:
    """The dimension pairs a rotary embedding rotates together."""
    half = rotary_dim // 2
    if pairing == ROTARY_HALF:
        return [(i, i + half) for i in range(half)]
    if pairing == ROTARY_ADJACENT:
        return [(2 * i, 2 * i + 1) for i in range(half)]
    raise ValueError(f"unknown rotary pairing {pairing!r}")


def signed_permutation(stream: KeyStream, n: int, strength: int) -> Monomial:
    """Any dimension to any other, each with its own sign and 2^±strength."""
    return Monomial(stream.permutation(n), _scales(stream, n, strength))


def rotary_map(stream: KeyStream, d: int, rotary_dim: int, pairing: str, strength: int) -> Monomial:
    """On each rotated pair (i, j), s·R(m·90°) with s = 2^±strength: it commutes with every rotation of the pair,
    so rotary embeddings see the same relative angles; the unrotated rest of the head gets a signed permutation."""
    perm = torch.arange(d)
    coef = torch.ones(d, dtype=_F64)
    pairs = rotary_pairs(rotary_dim, pairing)
    scale = torch.pow(2.0, stream.signs(len(pairs)) * strength)
    quarter = (stream.uniform(len(pairs)) * 4).long()  # how many quarter turns
    for (i, j), s, m in zip(pairs, scale.tolist(), quarter.tolist(), strict=True):
        # rows of s·R(m·90°): [[cos, −sin], [sin, cos]] with (cos, sin) = (1,0), (0,1), (−1,0), (0,−1)
        cos, sin = ((1, 0), (0, 1), (-1, 0), (0, -1))[m]
        if sin == 0:
            coef[i], coef[j] = s * cos, s * cos
        else:
            perm[i], perm[j] = j, i
            coef[i], coef[j] = -s * sin, s * sin
    if rotary_dim < d:
        rest = signed_permutation(stream, d - rotary_dim, strength)
        perm[rotary_dim:] = rest.perm + rotary_dim
        coef[rotary_dim:] = rest.coef
    return Monomial(perm, coef)


@dataclass(frozen=True)
class LayerTransform:
    """Every map of one layer, each on the axis of the stored tensor it acts on (see :mod:`.layer`)."""

    q: Monomial | None  # query rows [H·d]; None when queries and keys are left alone
    k: Monomial | None  # key rows [G·d]
    v: Monomial  # value rows [G·d]
    o: Monomial  # output-projection columns [H·d]
    up: Monomial | None  # MLP up rows; None when the layer has no MLP to protect
    gate: Monomial | None  # MLP gate rows (gated MLPs)
    down: Monomial | None  # MLP down columns
    head_order: torch.Tensor  # new query head h' holds old head head_order[h']


def layer_transform(lock_key: bytes, salt: bytes, unit: LayerUnit, strength: int) -> LayerTransform:
    """The transform of ``unit``, a pure function of key, salt, the unit's label and geometry, and strength."""
    d, n, groups = unit.head_dim, unit.group_size, unit.kv_heads
    label = unit.label
    # Whole heads move only when queries and keys move with them (their logits pick each head's attention).
    order = KeyStream(block_key(lock_key, salt, f"{label}|heads"))
    group_order = order.permutation(groups) if unit.qk else torch.arange(groups)
    within = [order.permutation(n) if unit.qk else torch.arange(n) for _ in range(groups)]
    head_order = torch.cat([group_order[g] * n + within[g] for g in range(groups)])

    def per_group(branch: str, make) -> list[Monomial]:  # type: ignore[no-untyped-def]
        return [make(KeyStream(block_key(lock_key, salt, f"{label}|group={g}|{branch}"))) for g in range(groups)]

    def spread(maps: list[Monomial], old: torch.Tensor) -> Monomial:
        """Per-group maps over whole rows, block j taken from old block ``old[j]`` (heads or groups)."""
        group_of_block = torch.arange(len(old)) // (len(old) // groups)
        perm = torch.cat([old[j] * d + maps[int(group_of_block[j])].perm for j in range(len(old))])
        coef = torch.cat([maps[int(group_of_block[j])].coef for j in range(len(old))])
        return Monomial(perm, coef)

    q = k = None
    if unit.qk:
        if unit.rotary_dim and unit.family.rotary:
            qk = per_group("qk", lambda s: rotary_map(s, d, unit.rotary_dim, unit.family.rotary or "", strength))
        else:
            qk = per_group("qk", lambda s: signed_permutation(s, d, strength))
        q = spread(qk, head_order)
        k = spread([m.reciprocal() for m in qk], group_order)
    vo = per_group("vo", lambda s: signed_permutation(s, d, strength))
    v = spread(vo, group_order)
    o = spread([m.reciprocal() for m in vo], head_order)
    up = gate = down = None
    if unit.mlp_size:
        stream = KeyStream(block_key(lock_key, salt, f"{label}|mlp"))
        perm = stream.permutation(unit.mlp_size)
        # A gated MLP computes act(gate·x) ⊙ (up·x): linear in each up row, so that row may be scaled.
        coef = _scales(stream, unit.mlp_size, strength) if unit.mlp_gated else torch.ones(unit.mlp_size, dtype=_F64)
        up = Monomial(perm, coef)
        gate = Monomial(perm, torch.ones(unit.mlp_size, dtype=_F64)) if unit.mlp_gated else None
        down = up.reciprocal()
    return LayerTransform(q, k, v, o, up, gate, down, head_order)
