"""Commit stage: make a folded version permanent.

``commit.py`` writes the version's cards, records it in the ledger, points ``latest`` at it and prunes; ``card.py``
makes the model card and the signed provenance; ``folders.py`` knows a stream's version and state folders on disk.
"""
