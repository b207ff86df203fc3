"""`mergeops daemon`: watch every registry, queue arrivals durably, fold them one at a time, in order.

Exactly once: an arrival is queued once per (stream, folder, content fingerprint) in the ledger's
``queue`` table, and the fold itself is idempotent by digest, so a crash anywhere (even between a
committed fold and marking its queue row done) converges on restart: the redo is a ``duplicate`` (which publishes
its version if the crash came before that version's publication was queued).
SIGTERM/SIGINT stop taking work; a fold in progress is abandoned between two tensors (nothing it
wrote survives), a registry scan between two folders or within one, and the process exits 0. One writer per home
(this daemon, or a `fold`), by a lock file.

An arrival can fail, the daemon cannot: each unit of work (scanning one registry folder, polling one Hub watch,
folding one arrival, publishing one version) is contained. Whatever it raises becomes that item's recorded rejection
(a folder the scan refuses, gate ``intake``) or failure, with its reason, and the loop goes on with the next item. A
failed fold or publication is tried again at the next start, up to ``ATTEMPTS`` failures in all; then it is
quarantined until an operator runs `mergeops retry`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from mergeops.errors import MergeopsError, RejectedError
from mergeops.hub_uri import HubUri
from mergeops.keys import load_signing_key, signing_key_path
from mergeops.ledger.kinds import CheckpointFacts
from mergeops.ledger.lock import WriterLock
from mergeops.ledger.store import LEDGER_FILE, QUARANTINED, Ledger, QueueItem, utc_now
from mergeops.pipeline import FoldResult, fold_checkpoint
from mergeops.policy import Policy
from mergeops.publish.publish import AlreadyPublished, publish
from mergeops.registry.hub import HubCommit, HubRegistry, RegistryUnavailable
from mergeops.registry.local import LocalRegistry
from mergeops.systemd import Notifier
from mergeops.threads import run_aside

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver as Observer

RESCAN_SECONDS = 120.0
HEARTBEAT_SECONDS = 5.0
ATTEMPTS = 3  # failed attempts at a fold or a publication (one per start) before it is quarantined


class FoldAbandoned(Exception):
    """Raised between two tensors when the daemon is asked to stop; the fold leaves nothing behind."""


class ScanStopped(BaseException):
    """Raised within a registry scan when the daemon is asked to stop. Not an Exception, so that the scan's
    containment of a folder's errors does not take it for that folder's fault."""


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _is_stop(exc: BaseException) -> bool:
    """Whether an exception raised while handling one item asks the daemon to stop, rather than being that item's
    failure. Anything else is the item's, a SystemExit too: the daemon itself never exits in the middle of an item,
    so one raised there comes from a library that the item's input drove into it."""
    return isinstance(exc, FoldAbandoned | ScanStopped | KeyboardInterrupt)


def log(event: str, **fields: Any) -> None:
    """One JSON line on stdout (journald keeps it)."""
    sys.stdout.write(json.dumps({"time": utc_now(), "event": event, **fields}, default=str) + "\n")
    sys.stdout.flush()


class Daemon:
    def __init__(self, policy: Policy, *, once: bool = False) -> None:
        self.policy = policy
        self.once = once
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.notifier = Notifier.from_environment(unset_environment=True)
        self.last_beat = 0.0
        self.reported_incomplete: set[Path] = set()
        self.reported_changed: set[str] = set()
        self.registries = [(stream.name, LocalRegistry(w.path, w.settle_seconds, w.marker))
                           for stream in policy.streams.values() for w in stream.watch if w.path is not None]
        self.hubs = [(stream.name, HubRegistry(w.hub, w.revision, policy.home / "downloads"), w.poll_seconds)
                     for stream in policy.streams.values() for w in stream.watch if w.hub is not None]
        self.next_poll = [0.0] * len(self.hubs)
        self.failed = 0  # arrivals whose fold failed in this run (not rejections)
        self.reported_errors: set[tuple[str, str]] = set()  # (where, error) of watch-level errors logged once

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping.set()
        self.wake.set()

    def run(self) -> int:
        # The lock comes before the key, so a start that fails on the key can say why in the status (and the
        # heartbeat of a daemon that is running is never overwritten).
        lock = WriterLock(self.policy.home, "daemon")
        try:
            key = load_signing_key(signing_key_path(self.policy.keys))
        except MergeopsError as exc:  # status must say why the daemon is not running, not its last run's state
            self._record_failed_start(exc)
            lock.release()
            raise
        previous = {s: signal.signal(s, self._stop) for s in (signal.SIGTERM, signal.SIGINT)}
        observers = [o for _, registry in self.registries if (o := self._watch(registry)) is not None]
        try:
            # the daemon's one ledger, for its whole life: folds and publications write through it too
            with Ledger.open(self.policy.home, key, lock=lock) as ledger:
                self.ledger = ledger
                retried = ledger.retry_failed()
                unpublished = ledger.queued("publishing")
                log("started", pid=os.getpid(), home=str(self.policy.home), streams=list(self.policy.streams),
                    retrying_failed=retried, resuming_publications=len(unpublished))
                for item in unpublished:  # a publication a crash interrupted: redo it before anything new
                    self._publish(item, json.loads(item.result)["version"])
                self.notifier.ready("watching registries")
                try:
                    self._loop()
                except BaseException as exc:  # status must not keep saying "folding" after a crash
                    self._set_status(f"crashed: {type(exc).__name__}: {exc}"[:500])
                    raise
                self._set_status("stopped")
        finally:
            for observer in observers:
                observer.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.notifier.stopping()
        log("stopped", pid=os.getpid(), failed=self.failed)
        # --once is a batch job: an arrival that failed (a broken policy, a missing base) must fail it too.
        return 1 if self.once and self.failed else 0

    def _watch(self, registry: LocalRegistry) -> Observer | None:
        """Wake on changes below the registry; if a folder in it (a tree too deep, too many folders for inotify)
        makes that fail, on changes in the registry itself: folders being written are rescanned every second."""
        try:
            return registry.watch(self.wake)
        except Exception as exc:
            log("watch_degraded", level="warning", registry=str(registry.path), error=describe(exc),
                note="watching only the registry's own entries; changes within a checkpoint folder are found by "
                     f"rescans (every {RESCAN_SECONDS:g} s, every second while one is changing)")
        try:
            return registry.watch(self.wake, recursive=False)
        except Exception as exc:
            log("watch_failed", level="warning", registry=str(registry.path), error=describe(exc),
                note=f"changes are found by rescans every {RESCAN_SECONDS:g} s")
            return None

    def _loop(self) -> None:
        next_rescan = 0.0
        while not self.stopping.is_set():
            waiting = False
            if self.wake.is_set() or time.monotonic() >= next_rescan:
                self.wake.clear()
                try:
                    waiting = self._scan()
                except ScanStopped:
                    return
                next_rescan = time.monotonic() + (1.0 if waiting else RESCAN_SECONDS)
            item = self._next_pending()
            if item is not None:
                self._fold(item)
                continue
            self._heartbeat("idle")
            if self.once and not waiting:
                return
            self.wake.wait(timeout=max(0.2, min(next_rescan - time.monotonic(), HEARTBEAT_SECONDS)))

    # -- the queue -------------------------------------------------------------------------------
    def _scan(self) -> bool:
        """Queue every complete new checkpoint; returns whether some are still changing."""
        waiting = False
        for stream, registry in self.registries:
            try:
                found = registry.scan(self.ledger.fingerprints(stream), self._scan_tick)
            except BaseException as exc:  # the registry itself (its folder unreadable): the other watches go on
                if _is_stop(exc):
                    raise
                self._report_once("scan_failed", stream, str(registry.path), exc)
                continue
            waiting = waiting or bool(found.changing)
            for refused in found.refused:  # each folder is contained: recorded, not scanned again until it changes
                self._reject(stream, refused.source, refused.fingerprint, "intake", refused.reason)
            for folder in found.incomplete:
                if folder not in self.reported_incomplete:
                    self.reported_incomplete.add(folder)
                    log("incomplete", stream=stream, source=str(folder),
                        note="settled but missing shards, bytes or its completion marker; waiting for the producer "
                             "to finish it")
            for candidate in found.ready:
                if self.ledger.taken_before(stream, candidate.source, candidate.fingerprint):
                    # A registry folder is taken once: changes after its fold are reported, not folded again.
                    if candidate.source not in self.reported_changed:
                        self.reported_changed.add(candidate.source)
                        log("changed_after_intake", level="warning", stream=stream, source=candidate.source,
                            note="this folder was folded before and has changed since; it is not folded again. "
                                 "Publish new weights as a new folder.")
                    continue
                self._enqueue(stream, candidate.source, candidate.fingerprint)
        for i, (stream, hub, poll_seconds) in enumerate(self.hubs):
            if time.monotonic() >= self.next_poll[i]:
                self.next_poll[i] = time.monotonic() + self._poll(stream, hub, poll_seconds)
        return waiting

    def _scan_tick(self) -> None:
        if self.stopping.is_set():
            raise ScanStopped
        self._heartbeat("scanning")

    def _report_once(self, event: str, stream: str, where: str, exc: BaseException) -> None:
        """Log a watch's error once per run (it is met again at every rescan or poll until its cause is fixed)."""
        if (where, describe(exc)) not in self.reported_errors:
            self.reported_errors.add((where, describe(exc)))
            log(event, level="error", stream=stream, where=where, error=describe(exc))

    def _enqueue(self, stream: str, source: str, fingerprint: str, state: str = "pending") -> None:
        if self.ledger.enqueue(stream, source, fingerprint, state):
            log("queued" if state == "pending" else state, stream=stream, source=source)

    def _reject(self, stream: str, source: str, fingerprint: str, gate: str, reason: str) -> None:
        """Record the rejection of a checkpoint refused before it was folded, and queue it as such (taken once)."""
        self.ledger.record_rejection(stream, CheckpointFacts(source), gate, reason)
        if self.ledger.enqueue(stream, source, fingerprint, "rejected"):
            log("rejected", stream=stream, source=source, gate=gate, reason=reason)

    def _poll(self, stream: str, hub: HubRegistry, poll_seconds: float) -> float:
        """Queue the new commits of a Hub registry, in order; returns seconds until the next poll."""
        def known(source: str) -> bool:
            return self.ledger.is_queued(stream, source)

        try:
            for commit in hub.new_commits(known):
                try:
                    hub.check(commit)
                except RejectedError as exc:  # refused from its file listing, before any download
                    self._reject(stream, commit.source, commit.sha, "validation", str(exc))
                    continue
                except Exception as exc:  # its listing broke the check itself: the commit's fault, not the watch's
                    self._reject(stream, commit.source, commit.sha, "intake", describe(exc))
                    continue
                self._enqueue(stream, commit.source, commit.sha)
        except RegistryUnavailable as exc:
            log("hub_unavailable", level="warning", stream=stream, repo=hub.repo, error=str(exc),
                retry_after=exc.retry_after)
            return exc.retry_after
        except BaseException as exc:  # the watch itself (a repository gone, a reply that makes no sense): poll later
            if _is_stop(exc):
                raise
            self._report_once("hub_poll_failed", stream, hub.repo, exc)
        return poll_seconds

    def _local_folder(self, stream: str, source: str) -> Path:
        """Where a queued arrival is on disk: a registry folder, or a Hub commit downloaded now."""
        uri = HubUri.parse(source)
        if uri is None:
            return Path(source)
        repo, sha = uri.repo, uri.revision or ""
        hub = next((h for s, h, _ in self.hubs if s == stream and h.repo == repo), None)
        if hub is None:
            raise MergeopsError(f"{source} was queued from a Hub watch the policy no longer has; add the watch back "
                                "to fold it.")
        # Download on a daemon thread while this one keeps pinging the watchdog and can still stop.
        return run_aside(lambda: hub.download(HubCommit(repo, sha, "", "")), lambda: self._between_tensors(0))

    def _next_pending(self) -> QueueItem | None:
        items = self.ledger.queued("pending", limit=1)
        return items[0] if items else None

    def _fold(self, item: QueueItem) -> None:
        stream, source = item.stream, item.source
        log("folding", stream=stream, source=source)
        self.notifier.status(f"folding {source} into {stream}")
        started = time.monotonic()
        try:
            folder = self._local_folder(stream, source)
            result = fold_checkpoint(self.policy, stream, folder, source=source, progress=self._between_tensors,
                                     ledger=self.ledger)
        except RegistryUnavailable as exc:  # stays pending; wait (interruptibly) before trying again
            log("hub_unavailable", level="warning", stream=stream, source=source, error=str(exc),
                retry_after=exc.retry_after)
            self.stopping.wait(exc.retry_after)
            return
        except FoldAbandoned:
            log("abandoned", stream=stream, source=source, note="will be folded again at the next start")
            return
        except BaseException as exc:  # never let one arrival stop the daemon
            if _is_stop(exc):
                raise
            self._count_failure(item, "failed", describe(exc))
            self.failed += 1
            return
        # A version to publish is first recorded as such (the durable intent), so a crash mid-publication is redone.
        publishing = self.policy.streams[stream].publish is not None and (
            result.status == "merged" or (result.status == "duplicate" and self._unpublished_head(stream, result)))
        self.ledger.set_queued(item.id, "publishing" if publishing else result.status,
                               json.dumps(result.to_json()))
        log(result.status, stream=stream, source=source, version=result.version, digest=result.digest,
            gate=result.gate, reason=result.reason, seconds=round(time.monotonic() - started, 3))
        if publishing:
            self._publish(item, result.version)

    def _unpublished_head(self, stream: str, redo: FoldResult) -> bool:
        """Whether a fold that found its checkpoint already folded is the redo of one a crash cut off between recording
        its version and queueing the publication: that version is the stream's head, never published."""
        head = self.ledger.head(stream)
        if head is None or head.version != redo.version or self.ledger.publications(stream, redo.version):
            return False
        # a publication of it that failed is still queued (redone at the next start, or quarantined): not a second one
        return not any(queued.publication and json.loads(queued.result or "{}").get("version") == redo.version
                       for state in ("publishing", QUARANTINED) for queued in self.ledger.queued(state, stream=stream))

    def _publish(self, item: QueueItem, version: int) -> None:
        """Publish a new version as the policy says, then mark its queue row done. A failure is recorded and the row
        stays to publish, so the next start redoes it (and `mergeops publish` can retry meanwhile), until it is
        quarantined."""
        stream = item.stream
        try:
            if self.policy.streams[stream].publish is not None:  # the policy may have dropped it since
                publication = publish(self.policy, stream, version, ledger=self.ledger)
                log("published", stream=stream, version=version, targets=list(publication.targets),
                    signer=publication.signer)
        except AlreadyPublished:
            pass  # the crash came after the record: nothing left to do
        except BaseException as exc:  # a target that is a file, a full disk: this publication fails, not the daemon
            if _is_stop(exc):
                raise
            self._count_failure(item, "publish_failed", f"publishing version {version}: {describe(exc)}",
                                version=version)
            return
        self.ledger.set_queued(item.id, "merged")

    def _count_failure(self, item: QueueItem, event: str, error: str, **fields: Any) -> None:
        """Record a failed fold or publication: it is tried again at the next start, or is quarantined."""
        retry_in = "publishing" if event == "publish_failed" else "failed"
        counted = self.ledger.count_failure(item.id, error, retry_in, ATTEMPTS)
        quarantined = counted.state == QUARANTINED
        log(QUARANTINED if quarantined else event, level="error", stream=item.stream, source=item.source,
            error=error, attempts=counted.attempts, **fields,
            note=f"failed {counted.attempts} times: not retried until `mergeops retry`" if quarantined
            else "tried again at the next start")

    def _between_tensors(self, _bytes: int) -> None:
        if self.stopping.is_set():
            raise FoldAbandoned
        self._heartbeat("folding")

    def _heartbeat(self, status: str) -> None:
        now = time.monotonic()
        self.notifier.watchdog_if_due()
        if now - self.last_beat < HEARTBEAT_SECONDS and status != "idle":
            return
        if now - self.last_beat < HEARTBEAT_SECONDS / 5:
            return
        self.last_beat = now
        self._set_status(status)

    def _record_failed_start(self, exc: Exception) -> None:
        """Write the heartbeat's status without the signing key (the heartbeat is not a signed record)."""
        if (self.policy.home / LEDGER_FILE).is_file():
            with Ledger(self.policy.home, None) as ledger:
                self.ledger = ledger
                self._set_status(f"crashed at start: {exc}"[:500])

    def _set_status(self, status: str) -> None:
        self.ledger.set_heartbeat(os.getpid(), status)
