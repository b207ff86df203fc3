"""The ledger: the signed, tamper-evident record of every checkpoint, version, protection and publication."""

from mergeops.ledger.store import Ledger, VersionRecord, writing

__all__ = ["Ledger", "VersionRecord", "writing"]
