"""The commit stage: make a folded version permanent. In order, each step durable before the next: the model card and
the signed provenance are written into the version folder, the ledger records the version (and what it prunes) in
one transaction, ``latest`` points at it, and old versions are pruned. A crash before the record leaves the stream at
its previous version; whatever was written past it is removed before the next fold."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from mergeops import __version__
from mergeops.commit.card import Input, VersionFacts, card_files
from mergeops.commit.folders import StreamFolders, version_dir
from mergeops.commit.owner import Owner, claim
from mergeops.durable import fsync_dir, write_durably
from mergeops.ledger.kinds import CheckpointFacts, LedgerEvent, StreamStarted, VersionCommitted, VersionPruned
from mergeops.ledger.store import Ledger, VersionRecord
from mergeops.model.digest import digest_of_listing
from mergeops.model.readme import read_license
from mergeops.policy import Policy, StreamConfig


@dataclass(frozen=True)
class NextVersion:
    """Where the stream's next version goes, after the head the ledger knows."""

    stream: StreamConfig
    head: VersionRecord | None
    folders: StreamFolders

    @property
    def number(self) -> int:
        return self.head.version + 1 if self.head else 1

    @property
    def output_dir(self) -> Path:
        return version_dir(self.folders.output, self.number)

    @property
    def state_dir(self) -> Path:
        return version_dir(self.folders.state_root, self.number)

    def discard(self) -> None:
        """Remove whatever was written for this version (a rejection, a duplicate, a crash)."""
        self.folders.remove_uncommitted(self.number)


def next_version(policy: Policy, stream: StreamConfig, ledger: Ledger) -> NextVersion:
    """The stream's next version, its folders cleared of a crash's leftovers and ``latest`` at the head (a crash after
    recording may have left it one step behind). The output folder must be this stream's (``owner.claim``) before
    anything in it is removed."""
    head = ledger.head(stream.name)
    owner = Owner(policy.home, stream.name, "output", f"[streams.{stream.name}].output")
    claim(stream.output, owner, lambda: _recorded_names(ledger, stream))
    plan = NextVersion(stream, head, StreamFolders.of(policy.home, stream.name, stream.output))
    plan.discard()
    if head is not None:
        plan.folders.point_latest(Path(head.output))
    return plan


def _recorded_names(ledger: Ledger, stream: StreamConfig) -> set[str]:
    """The version folders this home's ledger records in the stream's output folder."""
    output = stream.output.resolve()
    return {Path(v.output).name for v in ledger.versions(stream.name) if Path(v.output).parent.resolve() == output}


@dataclass(frozen=True)
class Committed:
    version: int
    output: Path
    output_digest: str


def commit(policy: Policy, ledger: Ledger, plan: NextVersion, *, base_path: Path, started: StreamStarted | None,
           base_digest: str, checkpoint: CheckpointFacts, output_files: dict[str, str], state_files: dict[str, str],
           gates: list[str], update_norm: float | None, eval_metrics: dict[str, float]) -> Committed:
    """Write the version's cards, record it, point ``latest`` at it and prune. ``checkpoint``: the facts recorded
    about the folded checkpoint (its digest, source, arrival, metrics...); ``started``: the stream's start, if it has
    started. Until the version is recorded a failure removes its folders; once it is, nothing does."""
    version = plan.number
    try:
        output_digest, events = _cards_and_events(policy, ledger, plan, base_path, started, base_digest, checkpoint,
                                                  output_files, state_files, gates, update_norm, eval_metrics)
        ledger.record(*events)
    except BaseException:  # (a full disk, a signing key gone) unless the record went through after all
        if not _recorded(ledger, plan):
            plan.discard()
        raise
    plan.folders.point_latest(plan.output_dir)  # only once the ledger knows the version
    plan.folders.prune(version, plan.stream.keep)
    return Committed(version, plan.output_dir, output_digest)


def _cards_and_events(policy: Policy, ledger: Ledger, plan: NextVersion, base_path: Path,
                      started: StreamStarted | None, base_digest: str, checkpoint: CheckpointFacts,
                      output_files: dict[str, str], state_files: dict[str, str], gates: list[str],
                      update_norm: float | None, eval_metrics: dict[str, float]) -> tuple[str, list[LedgerEvent]]:
    """Write the version's model card and signed provenance into its folder; the events that record it."""
    stream, version = plan.stream, plan.number
    output_digest = digest_of_listing(output_files)
    earlier = ledger.versions(stream.name)
    inputs = [Input("base", base_digest, str(base_path))]
    if plan.head is not None:
        inputs.append(Input("previous", plan.head.output_digest, plan.head.output))
    assert checkpoint.digest is not None and checkpoint.arrived is not None
    folded = Input("checkpoint", checkpoint.digest, checkpoint.source, checkpoint.adapter)
    facts = VersionFacts(stream.name, version, stream.method, stream.params, (*inputs, folded),
                         (*(Input("checkpoint", v.checkpoint, v.source, v.adapter) for v in earlier), folded),
                         policy.digest,
                         checkpoint.arrived, read_license(base_path), gates=tuple(gates))
    cards = card_files(facts, output_digest, ledger.key)
    for name, data in cards.items():
        write_durably(plan.output_dir / name, data)
    fsync_dir(plan.output_dir)
    events: list[LedgerEvent] = []
    if started is None:
        events.append(StreamStarted(stream.name, str(stream.base), base_digest, stream.method, stream.params))
    events.append(VersionCommitted(
        stream.name, version, stream.method, stream.params, plan.head.version if plan.head else None, checkpoint,
        output_digest, ledger.relative(plan.output_dir), output_files, ledger.relative(plan.state_dir),
        digest_of_listing(state_files), tuple(gates), policy.digest, f"mergeops {__version__}",
        update_norm=update_norm, cards={name: hashlib.sha256(data).hexdigest() for name, data in cards.items()},
        eval=eval_metrics))
    events += [VersionPruned(stream.name, v.version)
               for v in earlier if not v.pruned and v.version <= version - stream.keep]
    return output_digest, events


def _recorded(ledger: Ledger, plan: NextVersion) -> bool:
    """Whether the ledger holds the version (its transaction committed before the failure); if the ledger cannot
    say, the version is taken as recorded: its folders stay (the next fold removes them if they are not)."""
    try:
        head = ledger.head(plan.stream.name)
    except Exception:
        return True
    return head is not None and head.version == plan.number
