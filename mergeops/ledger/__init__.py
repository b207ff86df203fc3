"""The ledger: the signed, tamper-evident record of every checkpoint, version, protection and publication."""

from mergeops.ledger.store import Ledger, VersionRecord

__all__ = ["Ledger", "VersionRecord"]
