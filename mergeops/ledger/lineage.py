"""`mergeops lineage`: where did this model come from?

A target is ``STREAM``, ``STREAM@VERSION``, or the path of any model folder, found by its digest: a
merged version, a published copy (same digest as its version), or a protected copy (via the
protection record). The answer walks back from that version to the base, one folded checkpoint per step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergeops.errors import UsageError
from mergeops.ledger.store import Ledger, ProtectionRecord
from mergeops.model import folder_digest


def resolve(ledger: Ledger, target: str) -> tuple[str, int, dict[str, Any]]:
    """(stream, version, how the target was found)."""
    path = Path(target)
    if path.is_dir():
        digest = folder_digest(path)
        found = {"path": str(path.resolve()), "digest": digest}
        version = ledger.version_with_output(digest)
        if version is not None:
            return version.stream, version.version, found | {"as": "version"}
        protection = ledger.protection_with_output(digest)
        if protection is not None:
            version = ledger.version_with_output(protection.source_digest)
            if version is not None:
                return version.stream, version.version, found | {
                    "as": "protected copy", "protection": _protection(protection)}
        publication = ledger.publication_with_digest(digest)
        if publication is not None:
            return publication.stream, publication.version, found | {
                "as": "published copy", "publication": {"target": publication.target, "created": publication.created}}
        raise UsageError(f"{path} ({digest}) is not a model this ledger made, protected or published.")
    stream, _, number = target.partition("@")
    if ledger.started(stream) is None:
        raise UsageError(f"{target!r} is neither a model folder nor a stream of this policy.")
    if number:
        if not number.isdigit():
            raise UsageError(f"{target!r}: the version after @ must be a number, e.g. {stream}@3.")
        version_number = int(number)
    else:
        head = ledger.head(stream)
        if head is None:
            raise UsageError(f"stream {stream!r} has no versions yet.")
        version_number = head.version
    if ledger.version(stream, version_number) is None:
        raise UsageError(f"stream {stream!r} has no version {version_number}.")
    return stream, version_number, {"as": "version"}


def _protection(p: ProtectionRecord) -> dict[str, Any]:
    return {"output_digest": p.output_digest, "path": p.path, "key_fingerprint": p.key_fingerprint,
            "scheme": p.scheme, "created": p.created}


def lineage(ledger: Ledger, target: str) -> dict[str, Any]:
    stream, version, found = resolve(ledger, target)
    started = ledger.started(stream)
    steps = [{
        "version": v.version, "output_digest": v.output_digest, "path": v.output, "retained": not v.pruned,
        "method": v.method, "params": v.params, "created": v.created, "gates": list(v.gates),
        "policy_digest": v.policy_digest, "tool": v.tool, "signer": v.signer,
        "checkpoint": {"digest": v.checkpoint, "source": v.source, "arrived": v.arrived, "size": v.size,
                       "parameters": v.parameters, "metrics": v.metrics,
                       **({"adapter": v.adapter} if v.adapter else {})},
    } for v in reversed(ledger.versions(stream)) if v.version <= version]
    return {
        "target": target, "found": found, "stream": stream, "version": version,
        "base": {"source": started.base if started else None, "digest": started.base_digest if started else None},
        "steps": steps,
        "publications": [{"target": p.target, "signer": p.signer, "created": p.created}
                         for p in ledger.publications(stream, version)],
        "protections": [_protection(p) for p in ledger.protections_of(steps[0]["output_digest"])],
    }
