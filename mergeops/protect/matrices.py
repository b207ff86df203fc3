"""The secret matrices of MergeLock, derived from the lock key (SPEC §8).

Every block is derived independently: HKDF-SHA256 (salt = the protection's random salt, info names the
scheme, layer, key/value group and branch) gives a 32-byte key for a ChaCha20 keystream, and the
keystream's bytes become uniform and Gaussian float64 numbers. The stream is defined byte for byte here
(not by a library's random number generator), so the owner can rebuild the same matrices with any
later torch to unprotect. Keys, block keys and streams are never written anywhere.

A general block is U·diag(σ)·Vᵀ with Haar-orthogonal U, V (QR of a Gaussian matrix, signs fixed by R's
diagonal) and log σ uniform in [−log c, log c]; a rotary block is, on each rotary frequency pair, a
scaled rotation s·R(φ) with log s uniform in [−log c, log c] and φ uniform in [0, 2π), so it commutes with
every rotary position rotation. Each matrix comes with its exact inverse, built from the same factors.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import sys
from dataclasses import dataclass

import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mergeops.protect.architectures import ROTARY_ADJACENT, ROTARY_HALF

SCHEME = "mergelock-v1"
SALT_BYTES = 16
CONDITION = 3.0  # singular values (and rotary scales) lie in [1/c, c]
_F64 = torch.float64


def block_key(lock_key: bytes, salt: bytes, info: str) -> bytes:
    """HKDF-SHA256 of the lock key for one block; ``info`` names it, e.g. ``layer=3|group=1|qk``."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt,
                info=f"{SCHEME}|{info}".encode()).derive(lock_key)


def check_tag(lock_key: bytes, salt: bytes) -> str:
    """The key-check tag stored with a protected model: HMAC-SHA256 of the salt under an HKDF-derived key.

    It tells the owner's key from any other without revealing anything about the key or the matrices."""
    return hmac.new(block_key(lock_key, salt, "check"), salt, hashlib.sha256).hexdigest()


class KeyStream:
    """Uniform and Gaussian float64 numbers from a ChaCha20 keystream (nonce 0; every block key is unique)."""

    def __init__(self, key: bytes) -> None:
        self._encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` numbers in (0, 1): the top 53 bits of each little-endian 64-bit word, plus half a step."""
        data = self._encryptor.update(bytes(8 * n))
        if sys.byteorder != "little":  # the stream is defined little-endian
            data = b"".join(data[i:i + 8][::-1] for i in range(0, len(data), 8))
        words = torch.frombuffer(bytearray(data), dtype=torch.int64)
        return (((words >> 11) & (2 ** 53 - 1)).to(_F64) + 0.5) * 2.0 ** -53

    def normal(self, n: int) -> torch.Tensor:
        """``n`` standard normal numbers (Box–Muller, one per pair of uniforms)."""
        u = self.uniform(2 * n).reshape(2, n)
        return torch.sqrt(-2.0 * torch.log(u[0])) * torch.cos(2.0 * math.pi * u[1])


@dataclass(frozen=True)
class Invertible:
    """A matrix with its exact inverse."""

    m: torch.Tensor
    inv: torch.Tensor


def haar_orthogonal(stream: KeyStream, d: int) -> torch.Tensor:
    q, r = torch.linalg.qr(stream.normal(d * d).reshape(d, d))
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


def general_block(stream: KeyStream, d: int, c: float = CONDITION) -> Invertible:
    """U·diag(σ)·Vᵀ, Haar U and V, log σ uniform in [−log c, log c]."""
    u = haar_orthogonal(stream, d)
    v = haar_orthogonal(stream, d)
    sigma = torch.exp((2.0 * stream.uniform(d) - 1.0) * math.log(c))
    return Invertible((u * sigma) @ v.T, (v / sigma) @ u.T)


def rotary_pairs(rotary_dim: int, pairing: str) -> list[tuple[int, int]]:
    """The dimension pairs a rotary embedding rotates together."""
    half = rotary_dim // 2
    if pairing == ROTARY_HALF:
        return [(i, i + half) for i in range(half)]
    if pairing == ROTARY_ADJACENT:
        return [(2 * i, 2 * i + 1) for i in range(half)]
    raise ValueError(f"unknown rotary pairing {pairing!r}")


def rotary_block(stream: KeyStream, d: int, rotary_dim: int, pairing: str, c: float = CONDITION) -> Invertible:
    """A d×d matrix that commutes with every rotary rotation: s_j·R(φ_j) on each rotated pair j; any
    remaining (unrotated) dimensions get a general block of their own."""
    pairs = rotary_pairs(rotary_dim, pairing)
    scales = torch.exp((2.0 * stream.uniform(len(pairs)) - 1.0) * math.log(c))
    angles = 2.0 * math.pi * stream.uniform(len(pairs))
    m = torch.zeros(d, d, dtype=_F64)
    inv = torch.zeros(d, d, dtype=_F64)
    for (i, j), s, phi in zip(pairs, scales.tolist(), angles.tolist(), strict=True):
        cos, sin = math.cos(phi), math.sin(phi)
        m[i, i], m[i, j], m[j, i], m[j, j] = s * cos, -s * sin, s * sin, s * cos
        inv[i, i], inv[i, j], inv[j, i], inv[j, j] = cos / s, sin / s, -sin / s, cos / s
    if rotary_dim < d:
        rest = general_block(stream, d - rotary_dim, c)
        m[rotary_dim:, rotary_dim:] = rest.m
        inv[rotary_dim:, rotary_dim:] = rest.inv
    return Invertible(m, inv)


def qk_block(lock_key: bytes, salt: bytes, unit_label: str, group: int, d: int, rotary_dim: int,
             pairing: str | None, c: float = CONDITION) -> Invertible:
    """A for the query/key branch of one key/value group (queries get Aᵀ, keys A⁻¹ in [out, in] layout)."""
    stream = KeyStream(block_key(lock_key, salt, f"{unit_label}|group={group}|qk"))
    if rotary_dim and pairing:
        return rotary_block(stream, d, rotary_dim, pairing, c)
    return general_block(stream, d, c)


def vo_block(lock_key: bytes, salt: bytes, unit_label: str, group: int, d: int, c: float = CONDITION) -> Invertible:
    """B for the value/output branch of one key/value group (values get Bᵀ, the output's columns B⁻ᵀ)."""
    return general_block(KeyStream(block_key(lock_key, salt, f"{unit_label}|group={group}|vo")), d, c)
