"""in-toto attestations in DSSE envelopes: the format of every signed statement mergeops writes (a merged version's
provenance, a protected model's record), verifiable with any DSSE verifier and the policy's ``signing.pub.pem``."""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from mergeops import keys

IN_TOTO_STATEMENT = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
DSSE_PAYLOAD_TYPE = "application/vnd.in-toto+json"


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what a DSSE signature signs."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def dsse_envelope(statement: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    """``statement`` in a DSSE envelope signed with ``key`` (ECDSA P-256, SHA-256; keyid the key's fingerprint)."""
    payload = json.dumps(statement, separators=(",", ":"), sort_keys=True).encode()
    signature = keys.sign(key, pae(DSSE_PAYLOAD_TYPE, payload))
    return {"payloadType": DSSE_PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode(),
            "signatures": [{"keyid": keys.fingerprint(key.public_key()), "sig": base64.b64encode(signature).decode()}]}
