"""What every merged version says about itself (SPEC §3.4): a model card and a signed in-toto provenance.

Both name the folder digest, so both are excluded from it; the commit stage writes them last, from the weights'
hashes. The provenance is an in-toto Statement (predicate SLSA provenance v1) in a DSSE envelope signed with the
policy's signing key, so any DSSE verifier can check it with ``signing.pub.pem``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from mergeops import __version__
from mergeops.attestation import IN_TOTO_STATEMENT, PREDICATE_TYPE, dsse_envelope
from mergeops.hub_uri import HubUri, is_hub

BUILD_TYPE = "https://github.com/mergeops/mergeops/continual-merge/v1"  # how to read externalParameters
BUILDER_ID = "https://github.com/mergeops/mergeops"


@dataclass(frozen=True)
class Input:
    role: str  # "base", "previous" (the version this one extends) or "checkpoint"
    digest: str
    source: str
    adapter: dict[str, Any] | None = None  # a checkpoint that was a LoRA adapter: its settings

    @property
    def described(self) -> str:
        """How a card names it: a checkpoint that was an adapter says so, with its rank."""
        name = f"`{public_name(self.source)}`"
        return f"{name} (LoRA adapter, r={self.adapter['r']})" if self.adapter else name


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
        *(f"| {n} | {c.described} | `{c.digest}` |" for n, c in enumerate(facts.checkpoints, 1)), "",
        "`provenance.json` is a signed in-toto attestation (DSSE, SLSA provenance v1) of how this model was made.",
        "Full lineage, with who signed each step: `mergeops lineage <this folder> --policy <policy>`.", "",
    ]
    return "\n".join(lines)


def _dependency(role: str, item: Input) -> dict[str, Any]:
    annotations = {"role": role, **({"lora_adapter": item.adapter} if item.adapter else {})}
    found: dict[str, Any] = {"name": public_name(item.source), "annotations": annotations,
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


def card_files(facts: VersionFacts, digest: str, key: ec.EllipticCurvePrivateKey) -> dict[str, bytes]:
    return {"README.md": model_card(facts, digest).encode(),
            "provenance.json": (json.dumps(dsse_envelope(provenance(facts, digest), key), indent=2) + "\n").encode()}
