"""Fold: one streaming pass that merges a new checkpoint into a stream's running state."""
