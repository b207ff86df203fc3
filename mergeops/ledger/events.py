"""Ledger events: canonical JSON, the hash chain, and signatures.

Each event's hash covers its sequence number, time, kind, payload and the previous event's hash;
its signature (ECDSA P-256 by the policy's signing key) covers the same bytes. Editing, inserting,
reordering or deleting an event breaks the chain at that point, and nobody without the key can mend it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from mergeops import keys
from mergeops.ledger.kinds import LedgerEvent, parse

GENESIS = "sha256:" + "0" * 64  # the "previous hash" of the first event


def canonical(value: Any) -> str:
    """One byte-exact JSON text per value: sorted keys, no spaces, ASCII (any path, even undecodable, encodes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


@dataclass(frozen=True)
class Event:
    seq: int
    time: str  # ISO 8601, UTC
    kind: str
    payload: dict[str, Any]
    prev_hash: str
    hash: str
    signer: str  # fingerprint of the signing key
    signature: str  # hex DER

    @staticmethod
    def signed_bytes(seq: int, time: str, kind: str, payload: dict[str, Any], prev_hash: str) -> bytes:
        return canonical({"seq": seq, "time": time, "kind": kind, "payload": payload, "prev": prev_hash}).encode()

    @classmethod
    def create(cls, seq: int, time: str, kind: str, payload: dict[str, Any], prev_hash: str,
               key: ec.EllipticCurvePrivateKey) -> Event:
        data = cls.signed_bytes(seq, time, kind, payload, prev_hash)
        return cls(seq, time, kind, payload, prev_hash, "sha256:" + hashlib.sha256(data).hexdigest(),
                   keys.fingerprint(key.public_key()), keys.sign(key, data).hex())

    def typed(self) -> LedgerEvent:
        return parse(self.kind, self.payload)

    def row(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": self.time, "kind": self.kind, "payload": canonical(self.payload),
                "prev_hash": self.prev_hash, "hash": self.hash, "signer": self.signer, "signature": self.signature}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Event:
        return cls(row["seq"], row["time"], row["kind"], json.loads(row["payload"]), row["prev_hash"], row["hash"],
                   row["signer"], row["signature"])


def chain_problems(rows: list[dict[str, Any]], public_key: ec.EllipticCurvePublicKey) -> list[str]:
    """Everything wrong with the events table, one sentence each, in order."""
    problems = []
    expected_prev, expected_seq = GENESIS, 1
    signer = keys.fingerprint(public_key)
    for row in rows:
        seq = row["seq"]
        if seq != expected_seq:
            problems.append(f"event {expected_seq} is missing (the next event is {seq}): an event was deleted.")
        try:
            payload = json.loads(row["payload"])
            data = Event.signed_bytes(seq, row["time"], row["kind"], payload, row["prev_hash"])
        except (TypeError, ValueError):
            problems.append(f"event {seq} has a payload that is not valid JSON: the row was edited.")
            expected_prev, expected_seq = row["hash"], seq + 1
            continue
        if row["prev_hash"] != expected_prev:
            problems.append(f"event {seq} does not follow the event before it (previous hash differs): the chain "
                            "was cut or reordered here.")
        if canonical(payload) != row["payload"] or "sha256:" + hashlib.sha256(data).hexdigest() != row["hash"]:
            problems.append(f"event {seq} ({row['kind']}) does not match its hash: the row was edited.")
        if row["signer"] != signer:
            problems.append(f"event {seq} is signed by {row['signer']}, not by this policy's key {signer}.")
        else:
            try:
                valid = keys.verify(public_key, data, bytes.fromhex(row["signature"]))
            except ValueError:
                valid = False
            if not valid:
                problems.append(f"event {seq} ({row['kind']}) has an invalid signature: the row was edited.")
        expected_prev, expected_seq = row["hash"], seq + 1
    return problems
