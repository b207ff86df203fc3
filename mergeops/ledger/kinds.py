"""Every kind of ledger event, one frozen dataclass each: what writers record and what readers get back.

``payload()`` is the JSON the event's hash covers, so it must stay byte-for-byte what earlier releases wrote
(tests/ledger/test_kinds.py pins it); ``from_payload`` reads events written by any release, so a field added
later is optional and, where older events lack it, absent from the payload too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar


def _present(**fields: Any) -> dict[str, Any]:
    """The optional fields that are set (an unset one is left out of the payload, as older releases did)."""
    return {name: value for name, value in fields.items() if value is not None}


@dataclass(frozen=True)
class CheckpointFacts:
    """What is known of a checkpoint when it is recorded: a rejection may know no more than its source."""

    source: str
    arrived: str | None = None
    digest: str | None = None
    weights_digest: str | None = None
    size: int | None = None
    parameters: int | None = None
    dtypes: dict[str, int] | None = None
    mergelock: dict[str, Any] | None = None  # a MergeLock-protected checkpoint the policy allowed: its marks
    carried: tuple[str, ...] | None = None  # buffers it left out, folded as the base's (none: not in the payload)
    metrics: dict[str, float] | None = None  # only in version.committed
    adapter: dict[str, Any] | None = None  # a LoRA adapter: its settings (size and parameters are the adapter's)
    tied: dict[str, str] | None = None  # tensors it stores once, tied to its input embeddings: output -> input
    vocab_dropped: tuple[str, ...] | None = None  # rows matched to the base's by token string: the tokens dropped

    def payload(self) -> dict[str, Any]:
        return {"source": self.source} | _present(
            arrived=self.arrived, digest=self.digest, weights_digest=self.weights_digest, size=self.size,
            parameters=self.parameters, dtypes=self.dtypes, mergelock=self.mergelock,
            carried_from_base=list(self.carried) if self.carried else None, metrics=self.metrics,
            adapter=self.adapter, tied=self.tied,
            vocab_dropped=list(self.vocab_dropped) if self.vocab_dropped is not None else None)

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> CheckpointFacts:
        carried, dropped = p.get("carried_from_base"), p.get("vocab_dropped")
        return cls(p["source"], p.get("arrived"), p.get("digest"), p.get("weights_digest"), p.get("size"),
                   p.get("parameters"), p.get("dtypes"), p.get("mergelock"), tuple(carried) if carried else None,
                   p.get("metrics"), p.get("adapter"), p.get("tied"), tuple(dropped) if dropped is not None else None)


@dataclass(frozen=True)
class StreamStarted:
    kind: ClassVar[str] = "stream.started"
    stream: str
    base: str
    base_digest: str
    method: str
    params: dict[str, Any]

    def payload(self) -> dict[str, Any]:
        return {"stream": self.stream, "base": self.base, "base_digest": self.base_digest, "method": self.method,
                "params": self.params}

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> StreamStarted:
        return cls(p["stream"], p["base"], p["base_digest"], p["method"], p["params"])


@dataclass(frozen=True)
class CheckpointRejected:
    kind: ClassVar[str] = "checkpoint.rejected"
    stream: str
    checkpoint: CheckpointFacts
    gate: str
    reason: str

    def payload(self) -> dict[str, Any]:
        return {"stream": self.stream, "checkpoint": self.checkpoint.payload(), "gate": self.gate,
                "reason": self.reason}

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> CheckpointRejected:
        return cls(p["stream"], CheckpointFacts.from_payload(p["checkpoint"]), p["gate"], p["reason"])


@dataclass(frozen=True)
class VersionCommitted:
    kind: ClassVar[str] = "version.committed"
    stream: str
    version: int
    method: str
    params: dict[str, Any]
    previous: int | None
    checkpoint: CheckpointFacts
    output_digest: str
    path: str  # relative to the home (older ledgers: absolute)
    files: dict[str, str]  # sha256 of every file of the version but its cards
    state_path: str
    state_digest: str
    gates: tuple[str, ...]
    policy_digest: str
    tool: str
    update_norm: float | None = None
    cards: dict[str, str] = field(default_factory=dict)  # README.md and provenance.json (not in older ledgers)
    eval: dict[str, float] = field(default_factory=dict)  # not in older ledgers

    def payload(self) -> dict[str, Any]:
        return {"stream": self.stream, "version": self.version, "method": self.method, "params": self.params,
                "previous": self.previous, "checkpoint": self.checkpoint.payload(),
                "output_digest": self.output_digest, "path": self.path, "files": self.files, "cards": self.cards,
                "state_path": self.state_path, "state_digest": self.state_digest, "gates": list(self.gates),
                "update_norm": self.update_norm, "eval": self.eval, "policy_digest": self.policy_digest,
                "tool": self.tool}

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> VersionCommitted:
        return cls(p["stream"], p["version"], p["method"], p["params"], p["previous"],
                   CheckpointFacts.from_payload(p["checkpoint"]), p["output_digest"], p["path"], p["files"],
                   p["state_path"], p["state_digest"], tuple(p["gates"]), p["policy_digest"], p["tool"],
                   p.get("update_norm"), p.get("cards", {}), p.get("eval", {}))


@dataclass(frozen=True)
class VersionPruned:
    kind: ClassVar[str] = "version.pruned"
    stream: str
    version: int

    def payload(self) -> dict[str, Any]:
        return {"stream": self.stream, "version": self.version}

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> VersionPruned:
        return cls(p["stream"], p["version"])


@dataclass(frozen=True)
class ProtectionRecorded:
    kind: ClassVar[str] = "protection.recorded"
    source_digest: str
    output_digest: str
    path: str
    key_fingerprint: str  # of the MergeLock key, never the key
    scheme: str
    strength: int | None = None  # not in older ledgers
    transformed: tuple[str, ...] | None = None  # likewise

    def payload(self) -> dict[str, Any]:
        return {"source_digest": self.source_digest, "output_digest": self.output_digest, "path": self.path,
                "key_fingerprint": self.key_fingerprint, "scheme": self.scheme} | _present(
            strength=self.strength, transformed=list(self.transformed) if self.transformed is not None else None)

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> ProtectionRecorded:
        transformed = p.get("transformed")
        return cls(p["source_digest"], p["output_digest"], p["path"], p["key_fingerprint"], p["scheme"],
                   p.get("strength"), tuple(transformed) if transformed is not None else None)


@dataclass(frozen=True)
class PublicationRecorded:
    kind: ClassVar[str] = "publication.recorded"
    stream: str
    version: int
    output_digest: str
    target: str  # relative to the home, or hf://org/repo@sha
    signer: str | None
    files: dict[str, str] = field(default_factory=dict)  # every file of the copy (not in older ledgers)
    # published as a LoRA adapter against the base: {"rank": r, "error": overall relative error} (full model: None,
    # not in the payload)
    adapter: dict[str, Any] | None = None

    def payload(self) -> dict[str, Any]:
        return {"stream": self.stream, "version": self.version, "output_digest": self.output_digest,
                "target": self.target, "signer": self.signer, "files": self.files} | _present(adapter=self.adapter)

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> PublicationRecorded:
        return cls(p["stream"], p["version"], p["output_digest"], p["target"], p["signer"], p.get("files", {}),
                   p.get("adapter"))


LedgerEvent = (StreamStarted | CheckpointRejected | VersionCommitted | VersionPruned | ProtectionRecorded
               | PublicationRecorded)

KINDS: dict[str, type[LedgerEvent]] = {cls.kind: cls for cls in (
    StreamStarted, CheckpointRejected, VersionCommitted, VersionPruned, ProtectionRecorded, PublicationRecorded)}


def parse(kind: str, payload: dict[str, Any]) -> LedgerEvent:
    """The typed event of a stored ``kind`` and ``payload``."""
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r}; this ledger was written by a newer mergeops, upgrade it.")
    return KINDS[kind].from_payload(payload)
