"""Typed events: each kind's payload is byte for byte what earlier releases wrote (the hash chain covers it), and
ledgers written as plain payload dicts still verify, apply and read back."""

from __future__ import annotations

import json
import sqlite3

import pytest

from mergeops.keys import load_signing_key, public_key_for
from mergeops.ledger import Ledger
from mergeops.ledger.audit import audit
from mergeops.ledger.events import GENESIS, Event, canonical
from mergeops.ledger.kinds import (
    KINDS,
    CheckpointFacts,
    CheckpointRejected,
    ProtectionRecorded,
    PublicationRecorded,
    StreamStarted,
    VersionCommitted,
    VersionPruned,
    parse,
)
from mergeops.ledger.lineage import lineage
from mergeops.ledger.tables import apply

MARKS = {"scheme": "mergelock-v2", "version": 2, "strength": 6, "allowed": True}
FILES = {"model.safetensors": "ab" * 32}
DESCRIBED = {"source": "/reg/ck0", "arrived": "2026-01-02T03:04:05.000006+00:00", "size": 4096, "parameters": 1024,
             "dtypes": {"F32": 3}, "digest": "sha256:" + "cd" * 32, "weights_digest": "sha256:" + "ef" * 32}

# Each kind the old way, a literal dict as the writers built it (fold/engine.py, the daemon, publish, protect) ...
OLD = [
    ("stream.started", {"stream": "s", "base": "/models/base", "base_digest": "sha256:00", "method": "ema",
                        "params": {"alpha": 0.5, "nested": [1, 2.5]}}),
    ("checkpoint.rejected", {"stream": "s", "checkpoint": {"source": "hf://acme/ft@0123"}, "gate": "validation",
                             "reason": "pickle files are refused"}),
    ("checkpoint.rejected", {"stream": "s", "checkpoint": DESCRIBED, "gate": "finite", "reason": "NaN in w"}),
    ("version.committed", {
        "stream": "s", "version": 2, "method": "ema", "params": {"alpha": 0.5}, "previous": 1,
        "checkpoint": DESCRIBED | {"metrics": {"loss": 0.25}}, "output_digest": "sha256:11",
        "path": "../out/v0002", "files": FILES, "cards": {"README.md": "12" * 32},
        "state_path": "streams/s/state/v0002", "state_digest": "sha256:22", "gates": ["validation", "finite"],
        "update_norm": 1.5, "eval": {"accuracy": 0.9}, "policy_digest": "sha256:33", "tool": "mergeops 0.1.0"}),
    ("version.committed", {
        "stream": "s", "version": 1, "method": "ema", "params": {}, "previous": None,
        "checkpoint": DESCRIBED | {"metrics": {}}, "output_digest": "sha256:11", "path": "../out/v0001",
        "files": FILES, "cards": {}, "state_path": "streams/s/state/v0001", "state_digest": "sha256:22",
        "gates": [], "update_norm": None, "eval": {}, "policy_digest": "sha256:33", "tool": "mergeops 0.1.0"}),
    ("version.committed", {  # a protected checkpoint the policy allowed: its marks are kept with it
        "stream": "s", "version": 3, "method": "ema", "params": {}, "previous": 2,
        "checkpoint": DESCRIBED | {"mergelock": MARKS, "carried_from_base": ["embeddings.position_ids"], "metrics": {}},
        "output_digest": "sha256:11",
        "path": "../out/v0003", "files": FILES, "cards": {}, "state_path": "streams/s/state/v0003",
        "state_digest": "sha256:22", "gates": ["mergelock-allowed"], "update_norm": None, "eval": {},
        "policy_digest": "sha256:33", "tool": "mergeops 0.1.0"}),
    ("version.committed", {  # tied to its input embeddings, and its rows matched by token string, two dropped
        "stream": "s", "version": 4, "method": "ema", "params": {}, "previous": 3,
        "checkpoint": DESCRIBED | {"metrics": {}, "tied": {"lm_head.weight": "model.embed_tokens.weight"},
                                   "vocab_dropped": ["<tool>", "<think>"]}, "output_digest": "sha256:11",
        "path": "../out/v0004", "files": FILES, "cards": {}, "state_path": "streams/s/state/v0004",
        "state_digest": "sha256:22", "gates": [], "update_norm": None, "eval": {}, "policy_digest": "sha256:33",
        "tool": "mergeops 0.1.0"}),
    ("version.committed", {  # rows matched by token string (ids moved), none dropped: recorded as an empty list
        "stream": "s", "version": 5, "method": "ema", "params": {}, "previous": 4,
        "checkpoint": DESCRIBED | {"metrics": {}, "vocab_dropped": []}, "output_digest": "sha256:11",
        "path": "../out/v0005", "files": FILES, "cards": {}, "state_path": "streams/s/state/v0005",
        "state_digest": "sha256:22", "gates": [], "update_norm": None, "eval": {}, "policy_digest": "sha256:33",
        "tool": "mergeops 0.1.0"}),
    ("version.pruned", {"stream": "s", "version": 1}),
    ("protection.recorded", {"source_digest": "sha256:11", "output_digest": "sha256:44", "path": "../locked",
                             "key_fingerprint": "hmac-sha256:55", "scheme": "mergelock-v2", "strength": 8,
                             "transformed": ["attention query/key", "mlp neurons"]}),
    ("publication.recorded", {"stream": "s", "version": 2, "output_digest": "sha256:11", "target": "../pub/v0002",
                              "signer": None, "files": FILES}),
    ("publication.recorded", {"stream": "s", "version": 2, "output_digest": "sha256:11",
                              "target": "hf://acme/merged@abc", "signer": "sha256:66", "files": {}}),
]

# ... and the same events the new way.
NEW = [
    StreamStarted("s", "/models/base", "sha256:00", "ema", {"alpha": 0.5, "nested": [1, 2.5]}),
    CheckpointRejected("s", CheckpointFacts("hf://acme/ft@0123"), "validation", "pickle files are refused"),
    CheckpointRejected("s", CheckpointFacts(**DESCRIBED), "finite", "NaN in w"),
    VersionCommitted("s", 2, "ema", {"alpha": 0.5}, 1, CheckpointFacts(**DESCRIBED, metrics={"loss": 0.25}),
                     "sha256:11", "../out/v0002", FILES, "streams/s/state/v0002", "sha256:22",
                     ("validation", "finite"), "sha256:33", "mergeops 0.1.0", update_norm=1.5,
                     cards={"README.md": "12" * 32}, eval={"accuracy": 0.9}),
    VersionCommitted("s", 1, "ema", {}, None, CheckpointFacts(**DESCRIBED, metrics={}), "sha256:11", "../out/v0001",
                     FILES, "streams/s/state/v0001", "sha256:22", (), "sha256:33", "mergeops 0.1.0"),
    VersionCommitted("s", 3, "ema", {}, 2,
                     CheckpointFacts(**DESCRIBED, mergelock=MARKS, carried=("embeddings.position_ids",), metrics={}),
                     "sha256:11", "../out/v0003", FILES, "streams/s/state/v0003", "sha256:22", ("mergelock-allowed",),
                     "sha256:33", "mergeops 0.1.0"),
    VersionCommitted("s", 4, "ema", {}, 3,
                     CheckpointFacts(**DESCRIBED, metrics={}, tied={"lm_head.weight": "model.embed_tokens.weight"},
                                     vocab_dropped=("<tool>", "<think>")),
                     "sha256:11", "../out/v0004", FILES, "streams/s/state/v0004", "sha256:22", (), "sha256:33",
                     "mergeops 0.1.0"),
    VersionCommitted("s", 5, "ema", {}, 4, CheckpointFacts(**DESCRIBED, metrics={}, vocab_dropped=()),
                     "sha256:11", "../out/v0005", FILES, "streams/s/state/v0005", "sha256:22", (), "sha256:33",
                     "mergeops 0.1.0"),
    VersionPruned("s", 1),
    ProtectionRecorded("sha256:11", "sha256:44", "../locked", "hmac-sha256:55", "mergelock-v2", 8,
                       ("attention query/key", "mlp neurons")),
    PublicationRecorded("s", 2, "sha256:11", "../pub/v0002", None, FILES),
    PublicationRecorded("s", 2, "sha256:11", "hf://acme/merged@abc", "sha256:66"),
]


@pytest.mark.parametrize(("old", "new"), list(zip(OLD, NEW, strict=True)), ids=[kind for kind, _ in OLD])
def test_each_kind_writes_the_bytes_earlier_releases_wrote(old, new):
    kind, payload = old
    assert new.kind == kind
    assert canonical(new.payload()).encode() == canonical(payload).encode()
    assert parse(kind, json.loads(canonical(payload))) == new  # and reads back as the same event


def test_every_kind_is_covered():
    assert {kind for kind, _ in OLD} == set(KINDS)


# Events as releases before these fields existed wrote them.
OLDER = [
    ("version.committed", {
        "stream": "s", "version": 1, "method": "ema", "params": {}, "previous": None,
        "checkpoint": {"source": "/reg/ck0", "digest": "sha256:77"}, "output_digest": "sha256:11",
        "path": "/abs/out/v0001", "files": FILES, "state_path": "/abs/state/v0001", "state_digest": "sha256:22",
        "gates": ["validation"], "policy_digest": "sha256:33", "tool": "mergeops 0.0.1"}),
    ("protection.recorded", {"source_digest": "sha256:11", "output_digest": "sha256:44", "path": "/x",
                             "key_fingerprint": "k", "scheme": "mergelock-v1"}),
    ("publication.recorded", {"stream": "s", "version": 1, "output_digest": "sha256:11", "target": "/pub/v0001",
                              "signer": None}),
]


@pytest.mark.parametrize(("kind", "payload"), OLDER, ids=[kind for kind, _ in OLDER])
def test_fields_older_releases_did_not_write_may_be_absent(kind, payload):
    event = parse(kind, payload)
    assert event.kind == kind
    if isinstance(event, VersionCommitted):
        assert (event.cards, event.eval, event.update_norm, event.checkpoint.arrived) == ({}, {}, None, None)
        assert event.checkpoint.payload() == payload["checkpoint"]  # nothing added
    if isinstance(event, ProtectionRecorded):
        assert (event.strength, event.transformed) == (None, None)
        assert canonical(event.payload()) == canonical(payload)  # an unset optional field stays out
    if isinstance(event, PublicationRecorded):
        assert event.files == {}


def test_an_unknown_kind_says_to_upgrade():
    with pytest.raises(ValueError, match="newer mergeops"):
        parse("model.renamed", {})


def test_a_ledger_written_as_payload_dicts_audits_intact_and_reads_back(stream):
    """Re-write the fixture's ledger as an older release would have: its payloads as literal dicts through the raw
    Event.create (without the fields added since), then check it with today's code."""
    with Ledger.open_readonly(stream.home) as ledger:
        stored = [(row["kind"], json.loads(row["payload"]), row["time"]) for row in ledger.events()]
    for name in ("ledger.db", "ledger.db-wal", "ledger.db-shm", "ledger-head.json"):
        (stream.home / name).unlink(missing_ok=True)
    key = load_signing_key(stream.keys.signing)
    with Ledger.open(stream.home, key) as ledger:
        prev = GENESIS
        for seq, (kind, payload, time) in enumerate(stored, start=1):
            if kind == "version.committed":
                payload = {k: v for k, v in payload.items() if k not in ("eval", "update_norm")}
                payload["checkpoint"] = {k: v for k, v in payload["checkpoint"].items() if k != "weights_digest"}
            event = Event.create(seq, time, kind, payload, prev, key)
            ledger.db["events"].insert(event.row())
            apply(ledger.db, event)
            prev = event.hash
        ledger._write_head(event)

    with Ledger.open_readonly(stream.home) as ledger:
        report = audit(ledger, public_key_for(stream.keys))
        assert report.problems == [] and report.events == len(stored)
        assert [v.version for v in ledger.versions("s")] == [1, 2, 3]
        assert ledger.head("s").output == str(stream.streams["s"].output / "v0003")
        assert ledger.rejections("s")[0].gate == "finite"
        assert [s["version"] for s in lineage(ledger, "s")["steps"]] == [3, 2, 1]
        typed = [Event.from_row(row).typed() for row in ledger.events()]
    assert [e.kind for e in typed] == [kind for kind, _, _ in stored]
    committed = [e for e in typed if isinstance(e, VersionCommitted)]
    assert [e.update_norm for e in committed] == [None] * 3 and committed[0].eval == {}

    # and today's writer appends to it
    with Ledger.open(stream.home, key) as ledger:
        ledger.record(VersionPruned("s", 2))
    with Ledger.open_readonly(stream.home) as ledger:
        assert audit(ledger, public_key_for(stream.keys)).problems == []


def test_a_writer_appends_typed_events_to_the_chain(stream):
    with Ledger.open(stream.home, load_signing_key(stream.keys.signing)) as ledger:
        rejected = ledger.record_rejection("s", CheckpointFacts("/reg/late"), "validation", "no config.json")
    assert rejected == CheckpointRejected("s", CheckpointFacts("/reg/late"), "validation", "no config.json")
    connection = sqlite3.connect(stream.home / "ledger.db")
    payload = connection.execute("SELECT payload FROM events ORDER BY seq DESC LIMIT 1").fetchone()[0]
    connection.close()
    assert payload == canonical({"stream": "s", "checkpoint": {"source": "/reg/late"}, "gate": "validation",
                                 "reason": "no config.json"})
