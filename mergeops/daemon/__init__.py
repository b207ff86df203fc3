"""The mergeops daemon: watch registries, fold arrivals one at a time, talk to systemd (SPEC §7)."""
