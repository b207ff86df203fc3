"""Intake stage: take a checkpoint in and decide whether it is one.

``checkpoint.py`` opens it, describes it and hashes it in the background; ``validate.py`` checks it is complete,
well-formed and matches the base; ``metrics.py`` reads its training metrics; ``inspect.py`` reports on a folder;
``curvature.py`` converts a Trainer's ``optimizer.pt`` into the curvature OTA needs.
"""
