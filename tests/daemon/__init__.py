"""The daemon: systemd notify protocol and unit file."""
