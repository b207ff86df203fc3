"""MergeLock (SPEC §8): protect a model so that it cannot be merged, and unprotect it with the lock key.

>>> report = protect("models/v3", "published/v3-locked", load_lock_key(Path("keys/lock.key")), verify=True)
>>> record_protection(policy, report)  # in the policy's ledger
"""

from mergeops.model.architectures import FAMILIES, supported
from mergeops.protect.mergelock import (
    DEFAULT_STRENGTH,
    is_protected,
    protect,
    protection_marks,
    record_protection,
    unprotect,
)

__all__ = ["DEFAULT_STRENGTH", "FAMILIES", "is_protected", "protect", "protection_marks", "record_protection",
           "supported", "unprotect"]
