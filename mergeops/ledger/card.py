"""What every merged version says about itself (SPEC §3.4): a model card and a signed in-toto provenance.

Both name the folder digest, so both are excluded from it and written last, from the weights' hashes. The
provenance is an in-toto Statement (predicate SLSA provenance v1) in a DSSE envelope signed with the policy's
signing key, so any DSSE verifier can check it with ``signing.pub.pem``.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from mergeops import __version__, keys
from mergeops.hub_uri import HubUri, is_hub

IN_TOTO_STATEMENT = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
DSSE_PAYLOAD_TYPE = "application/vnd.in-toto+json"
BUILD_TYPE = "https://github.com/mergeops/mergeops/continual-merge/v1"  # how to read externalParameters
BUILDER_ID = "https://github.com/mergeops/mergeops"


@dataclass(frozen=True)
class Input:
    role: str  # "base", "previous" (the version this one extends) or "checkpoint"
    digest: str
    source: str


@dataclass(frozen=True)
class VersionFacts:
    stream: str
    version: int
    method: str
    params: dict[str, Any]
    inputs: tuple[Input, ...]
    checkpoints: tuple[Input, ...]  # every checkpoint folded so far, oldest first
    policy_digest: str
    created: str
    license: str | None = None
    gates: tuple[str, ...] = ()


def read_front_matter(folder: Path) -> dict[str, str | list[str]]:
    """The simple ``key: value`` and ``key:`` + ``- item`` entries of a model card's YAML front matter."""
    card = folder / "README.md"
    if not card.is_file():
        return {}
    match = re.match(r"^---\n(.*?)\n---", card.read_text(errors="replace"), re.S)
    if not match:
        return {}
    found: dict[str, str | list[str]] = {}
    key = None
    for line in match.group(1).splitlines():
        item = re.match(r"^\s*-\s+(.+?)\s*$", line)
        entry = re.match(r"^([A-Za-z_][\w-]*):\s*(.*?)\s*$", line)
        if item and key is not None and isinstance(found.get(key), list):
            found[key].append(_unquote(item.group(1)))  # type: ignore[union-attr]
        elif entry:
            key = entry.group(1)
            found[key] = _unquote(entry.group(2)) if entry.group(2) else []
    return found


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return json.loads(value) if value[0] == '"' else value[1:-1]
    return value


def read_license(folder: Path) -> str | None:
    """The ``license`` of a model card's YAML front matter, if any."""
    found = read_front_matter(folder).get("license")
    return found if isinstance(found, str) and found else None


def hub_repo(source: str) -> str | None:
    """The Hub repo id of a source (hf://org/repo@sha -> org/repo); None for a local folder."""
    uri = HubUri.parse(source)
    return uri.repo if uri is not None else None


def public_name(source: str) -> str:
    """How a card names a source: ``org/repo@sha`` on the Hub, a local folder by its name only (never the
    machine's absolute path; the provenance names it by digest)."""
    uri = HubUri.parse(source)
    return uri.public_name if uri is not None else Path(source).name


def model_card(facts: VersionFacts, digest: str) -> str:
    base = next(i for i in facts.inputs if i.role == "base")
    ids = list(dict.fromkeys(r for r in (hub_repo(base.source), *(hub_repo(c.source) for c in facts.checkpoints))
                             if r))
    front = ["---", *(["base_model:", *(f"- {json.dumps(i)}" for i in ids)] if ids else []),
             "base_model_relation: merge", "tags:", "- mergeops", f"- {facts.method}"]
    if facts.license:
        front.append(f"license: {facts.license}")
    front.append("---")
    params = ", ".join(f"{k}={json.dumps(v)}" for k, v in facts.params.items()) or "defaults"
    lines = [
        *front, "",
        f"# {facts.stream} v{facts.version:04d}", "",
        f"A continual merge made by mergeops {__version__}: {len(facts.checkpoints)} fine-tuned checkpoint(s) of "
        f"the base folded one at a time with `{facts.method}` ({params}).", "",
        f"- digest: `{digest}`",
        f"- base: `{public_name(base.source)}` (`{base.digest}`)",
        f"- policy: `{facts.policy_digest}`",
        f"- gates passed by the newest checkpoint: {', '.join(facts.gates) or 'none'}", "",
        "| # | checkpoint | digest |", "|---|---|---|",
        *(f"| {n} | `{public_name(c.source)}` | `{c.digest}` |" for n, c in enumerate(facts.checkpoints, 1)), "",
        "`provenance.json` is a signed in-toto attestation (DSSE, SLSA provenance v1) of how this model was made.",
        "Full lineage, with who signed each step: `mergeops lineage <this folder> --policy <policy>`.", "",
    ]
    return "\n".join(lines)


def _dependency(role: str, item: Input) -> dict[str, Any]:
    found: dict[str, Any] = {"name": public_name(item.source), "annotations": {"role": role},
                             "digest": {"sha256": item.digest.removeprefix("sha256:")}}
    if is_hub(item.source):
        found["uri"] = item.source
    return found


def provenance(facts: VersionFacts, digest: str) -> dict[str, Any]:
    """The in-toto Statement: subject the folder digest, predicate SLSA provenance v1 listing every input."""
    earlier = facts.checkpoints[:-1]
    return {
        "_type": IN_TOTO_STATEMENT,
        "subject": [{"name": f"{facts.stream}/v{facts.version:04d}",
                     "digest": {"sha256": digest.removeprefix("sha256:")}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"stream": facts.stream, "method": facts.method, "parameters": facts.params,
                                       "policy_digest": facts.policy_digest},
                "internalParameters": {"version": facts.version, "gates": list(facts.gates)},
                "resolvedDependencies": [*(_dependency(i.role, i) for i in facts.inputs),
                                         *(_dependency("folded earlier", c) for c in earlier)],
            },
            "runDetails": {"builder": {"id": BUILDER_ID, "version": {"mergeops": __version__}},
                           "metadata": {"invocationId": f"{facts.stream}/v{facts.version:04d}",
                                        "startedOn": facts.created}},
        },
    }


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


def card_files(facts: VersionFacts, digest: str, key: ec.EllipticCurvePrivateKey) -> dict[str, bytes]:
    return {"README.md": model_card(facts, digest).encode(),
            "provenance.json": (json.dumps(dsse_envelope(provenance(facts, digest), key), indent=2) + "\n").encode()}
