"""The ledger: the signed, tamper-evident record of every checkpoint, version, protection and publication.

Every read and write of ``ledger.db`` goes through :class:`Ledger` (``store.py``); each event kind is one typed
dataclass (``kinds.py``) used by writers and readers alike; ``events.py`` chains and signs them, ``tables.py`` applies
them, ``audit.py`` checks everything the record vouches for, ``lineage.py`` answers "where did this model come from?".
"""

from mergeops.ledger.store import Ledger, VersionRecord, writing

__all__ = ["Ledger", "VersionRecord", "writing"]
