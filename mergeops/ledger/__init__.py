"""Commit stage: the record of what was folded into which stream, and of what was rejected."""

from mergeops.ledger.journal import Journal, RejectionRecord, VersionRecord

__all__ = ["Journal", "RejectionRecord", "VersionRecord"]
