"""The mergeops daemon (SPEC §7): ``loop.py`` watches the registries, queues arrivals in the ledger and folds them one
at a time through the pipeline, publishing each new version, and reports to systemd; ``status.py`` reads its state."""
