"""systemd's notify protocol (sd_notify(3)), spoken directly: no libsystemd, no extra dependency.

Under a ``Type=notify`` unit systemd passes the daemon ``NOTIFY_SOCKET`` (a file-system path, or an abstract
socket name written with a leading ``@``), and with ``WatchdogSec=`` also ``WATCHDOG_USEC`` and
``WATCHDOG_PID``. The daemon sends newline-separated ``KEY=VALUE`` assignments in one ``AF_UNIX``
``SOCK_DGRAM`` datagram per message: ``READY=1`` when it serves, ``STATUS=...`` for ``systemctl status``,
``WATCHDOG=1`` at least every ``WATCHDOG_USEC`` microseconds, ``STOPPING=1`` on shutdown.

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op returning False. A failed send is logged at
debug level and returns False: a daemon that runs for months must not die because the notify socket went
away, and a send never blocks longer than ``timeout`` seconds.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"
#: What systemd hands the service for the notify protocol; child processes must not inherit it.
NOTIFY_VARIABLES = (NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID)

# systemd reads at most this many bytes of one notification (NOTIFY_BUFFER_MAX); STATUS= text is cut to fit.
_MAX_MESSAGE_BYTES = 4096
_MAX_STATUS_BYTES = 1024


def child_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default ``os.environ``) as a new dict without ``NOTIFY_SOCKET`` and ``WATCHDOG_*``.

    Pass it as ``env=`` to subprocesses (the eval gate's commands), so that a child can neither notify on the
    daemon's behalf nor believe it is the one being watched.
    """
    source = os.environ if environ is None else environ
    return {k: v for k, v in source.items() if k != NOTIFY_SOCKET and not k.startswith("WATCHDOG_")}


def _socket_address(value: str | None) -> str | None:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value, or None when it is unset or unsupported."""
    if not value:
        return None
    if value.startswith("@"):  # abstract namespace: a leading NUL byte instead of '@'
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # e.g. "vsock:CID:PORT" (a VM's host manager): not something this daemon is run under.
    log.debug("NOTIFY_SOCKET=%r is neither a path nor an abstract socket name; notifications are off", value)
    return None


def _positive_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value.strip())
    except ValueError:
        return None
    return number if number > 0 else None


def _clean(value: str) -> str:
    """One line: a newline inside a value would start a new assignment."""
    return " ".join(str(value).splitlines())


class Notifier:
    """Sends systemd notifications; every method returns whether the datagram was sent."""

    def __init__(self, address: str | None = None, *, watchdog_usec: int | None = None, timeout: float = 2.0):
        """``address`` is a ``NOTIFY_SOCKET`` value (``/path`` or ``@abstract``); None disables everything.

        ``watchdog_usec`` is the watchdog period this process must honour (None: no watchdog).
        ``timeout`` bounds one send, in seconds, should systemd's socket queue be full.
        """
        self.address = address
        self._target = _socket_address(address)
        self.watchdog_usec = watchdog_usec if self._target is not None and watchdog_usec else None
        self.timeout = timeout
        self._lock = threading.Lock()
        self._last_ping: float | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, *, unset_environment: bool = False,
                         timeout: float = 2.0) -> Notifier:
        """A Notifier for this process from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        The watchdog applies only when ``WATCHDOG_PID`` is unset or names this process: a child that inherited
        the variables must not ping for its parent. ``unset_environment`` removes the variables from
        ``os.environ`` afterwards (like sd_notify's ``unset_environment``), so that no child process inherits
        them; :func:`child_environment` does the same for one subprocess without touching ``os.environ``.
        """
        env = os.environ if environ is None else environ
        address = env.get(NOTIFY_SOCKET) or None
        usec = _positive_int(env.get(WATCHDOG_USEC))
        pid_value = env.get(WATCHDOG_PID)
        if usec is not None and pid_value is not None and _positive_int(pid_value) != os.getpid():
            log.debug("WATCHDOG_PID=%s is not this process (%d): no watchdog pings", pid_value, os.getpid())
            usec = None
        if unset_environment:
            for name in NOTIFY_VARIABLES:
                os.environ.pop(name, None)
        return cls(address, watchdog_usec=usec, timeout=timeout)

    @property
    def enabled(self) -> bool:
        """Whether this process runs under systemd with a usable notify socket."""
        return self._target is not None

    @property
    def watchdog_enabled(self) -> bool:
        """Whether systemd expects WATCHDOG=1 from this process."""
        return self.watchdog_usec is not None

    def watchdog_interval(self) -> float | None:
        """The recommended ping period in seconds (half of ``WATCHDOG_USEC``), or None without a watchdog."""
        if self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    # --- messages ---

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; False when disabled or the send failed."""
        if self._target is None or not assignments:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        if len(message) > _MAX_MESSAGE_BYTES:
            log.debug("systemd notification of %d bytes is too long; not sent", len(message))
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(self.timeout)
                sent = sock.sendto(message, self._target)
        except (OSError, ValueError) as exc:  # ENOENT, ECONNREFUSED, timeout, a name too long, an embedded NUL
            log.debug("systemd notification %r not sent to %s: %s", assignments[0], self.address, exc)
            return False
        return sent == len(message)

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up is done (with an optional STATUS= in the same datagram)."""
        return self.notify("READY=1", *self._status_field(status))

    def status(self, text: str) -> bool:
        """STATUS=text: one line shown by ``systemctl status``."""
        return self.notify(*self._status_field(text))

    def watchdog(self) -> bool:
        """WATCHDOG=1, when systemd watches this process (otherwise False, nothing sent)."""
        if self.watchdog_usec is None:
            return False
        sent = self.notify("WATCHDOG=1")
        if sent:
            with self._lock:
                self._last_ping = time.monotonic()
        return sent

    def watchdog_if_due(self) -> bool:
        """WATCHDOG=1 only if the last successful ping is older than a quarter of ``WATCHDOG_USEC``.

        Cheap enough to call per tensor from a long fold (most calls just read the clock), and pings well
        inside the period even if the loop between calls is slow.
        """
        if self.watchdog_usec is None:
            return False
        with self._lock:
            last = self._last_ping
        if last is not None and time.monotonic() - last < self.watchdog_usec / 4 / 1_000_000:
            return False
        return self.watchdog()

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutdown has begun (SIGTERM received)."""
        return self.notify("STOPPING=1", *self._status_field(status))

    @staticmethod
    def _status_field(text: str | None) -> tuple[str, ...]:
        if text is None:
            return ()
        encoded = _clean(text).encode("utf-8", "replace")[:_MAX_STATUS_BYTES]
        return ("STATUS=" + encoded.decode("utf-8", "ignore"),)

    def __repr__(self) -> str:
        return f"Notifier(address={self.address!r}, watchdog_usec={self.watchdog_usec!r})"
