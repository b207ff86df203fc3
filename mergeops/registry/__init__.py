"""Registries the daemon watches for new checkpoints: local folders and Hugging Face Hub repos (SPEC §7)."""
