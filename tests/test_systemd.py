"""The sd_notify protocol against real AF_UNIX datagram sockets, and the unit file against systemd-analyze."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mergeops.systemd import NOTIFY_VARIABLES, Notifier, child_environment

pytestmark = pytest.mark.timeout(60)

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "mergeops.service"
EXEC_PATH = "/usr/local/bin/mergeops"
APT_INSTALL = "apt-get update && apt-get install -y systemd"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests may run under systemd themselves: start each from an environment without the variables."""
    for name in NOTIFY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def short_dir(tmp_path: Path) -> Path:
    """tmp_path, or a shorter directory when a socket path there would exceed sun_path (108 bytes)."""
    if len(str(tmp_path / "notify.sock")) < 100:
        return tmp_path
    return Path(tempfile.mkdtemp(prefix="sd-", dir="/tmp"))


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(short_dir(tmp_path) / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield sock, path


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    name = f"mergeops-test-{os.getpid()}-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        yield sock, "@" + name


def receive(sock: socket.socket) -> str:
    return sock.recv(8192).decode()


def nothing_received(sock: socket.socket) -> bool:
    sock.settimeout(0.2)
    try:
        sock.recv(8192)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(5)
    return False


def environment(monkeypatch: pytest.MonkeyPatch, address: str, *, usec: str | None = "120000000",
                pid: int | None = None) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() if pid is None else pid))


def exchange(notifier: Notifier, sock: socket.socket) -> None:
    assert notifier.enabled and notifier.watchdog_enabled
    assert notifier.ready() is True
    assert receive(sock) == "READY=1"
    assert notifier.status("folding ckpt-0007 into assistant (3/12 tensors)") is True
    assert receive(sock) == "STATUS=folding ckpt-0007 into assistant (3/12 tensors)"
    assert notifier.watchdog() is True
    assert receive(sock) == "WATCHDOG=1"
    assert notifier.stopping() is True
    assert receive(sock) == "STOPPING=1"


def test_path_socket_receives_ready_status_watchdog_stopping(monkeypatch, path_socket):
    sock, path = path_socket
    environment(monkeypatch, path)
    exchange(Notifier.from_environment(), sock)


def test_abstract_socket_receives_ready_status_watchdog_stopping(monkeypatch, abstract_socket):
    sock, address = abstract_socket
    environment(monkeypatch, address)
    exchange(Notifier.from_environment(), sock)


def test_combined_and_other_messages(monkeypatch, path_socket):
    sock, path = path_socket
    environment(monkeypatch, path)
    notifier = Notifier.from_environment()
    assert notifier.ready("watching 2 registries")
    assert receive(sock) == "READY=1\nSTATUS=watching 2 registries"
    assert notifier.status("two\nlines")  # a newline would start a new assignment
    assert receive(sock) == "STATUS=two lines"
    assert notifier.status("x" * 10_000)
    assert len(receive(sock)) == len("STATUS=") + 1024
    assert notifier.stopping("SIGTERM: abandoning the current fold")
    assert receive(sock) == "STOPPING=1\nSTATUS=SIGTERM: abandoning the current fold"


def test_watchdog_pid_of_another_process_disables_pings(monkeypatch, path_socket):
    sock, path = path_socket
    environment(monkeypatch, path, pid=os.getpid() + 1)
    notifier = Notifier.from_environment()
    assert not notifier.watchdog_enabled
    assert notifier.watchdog_interval() is None
    assert notifier.watchdog() is False
    assert notifier.watchdog_if_due() is False
    assert nothing_received(sock)
    assert notifier.ready() is True  # the notify socket itself still works
    assert receive(sock) == "READY=1"


def test_watchdog_applies_without_watchdog_pid(monkeypatch, path_socket):
    sock, path = path_socket
    environment(monkeypatch, path)
    monkeypatch.delenv("WATCHDOG_PID")
    notifier = Notifier.from_environment()
    assert notifier.watchdog() is True
    assert receive(sock) == "WATCHDOG=1"


def test_no_watchdog_usec_means_no_pings(monkeypatch, path_socket):
    sock, path = path_socket
    environment(monkeypatch, path, usec=None)
    notifier = Notifier.from_environment()
    assert notifier.watchdog_interval() is None
    assert notifier.watchdog() is False
    assert nothing_received(sock)


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch, path_socket):
    _, path = path_socket
    environment(monkeypatch, path, usec="120000000")
    assert Notifier.from_environment().watchdog_interval() == 60.0
    for bad in ("0", "-5", "soon", ""):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert Notifier.from_environment().watchdog_interval() is None


def test_watchdog_if_due_throttles(monkeypatch, path_socket):
    sock, path = path_socket
    environment(monkeypatch, path, usec="400000")  # 0.4 s: due again after 0.1 s
    notifier = Notifier.from_environment()
    assert notifier.watchdog_if_due() is True
    assert receive(sock) == "WATCHDOG=1"
    assert notifier.watchdog_if_due() is False
    assert nothing_received(sock)  # waits 0.2 s
    assert notifier.watchdog_if_due() is True
    assert receive(sock) == "WATCHDOG=1"


def test_outside_systemd_everything_is_a_quiet_no_op(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "120000000")  # a stray variable alone enables nothing
    notifier = Notifier.from_environment()
    assert not notifier.enabled and not notifier.watchdog_enabled
    assert notifier.watchdog_interval() is None
    calls = [notifier.ready, lambda: notifier.status("x"), notifier.watchdog, notifier.watchdog_if_due,
             notifier.stopping, lambda: notifier.notify("X=1")]
    assert [call() for call in calls] == [False] * len(calls)
    assert Notifier().ready() is False


@pytest.mark.parametrize("address", ["relative/notify.sock", "vsock:2:1234"])
def test_unsupported_addresses_disable_notifications(address):
    notifier = Notifier(address, watchdog_usec=1_000_000)
    assert not notifier.enabled and not notifier.watchdog_enabled
    assert notifier.ready() is False


def test_closed_socket_returns_false_without_raising(monkeypatch, tmp_path):
    path = str(short_dir(tmp_path) / "gone.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.close()  # the path is still there, nobody listens: ECONNREFUSED
    environment(monkeypatch, path)
    notifier = Notifier.from_environment()
    assert notifier.ready() is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False
    os.unlink(path)  # and now the path is gone: ENOENT
    assert notifier.watchdog() is False


def test_unbound_abstract_name_and_overlong_path_return_false():
    assert Notifier(f"@mergeops-nobody-{uuid.uuid4().hex}").ready() is False
    assert Notifier("/" + "x" * 200).ready() is False  # longer than sun_path


def test_full_socket_queue_times_out_instead_of_blocking(path_socket):
    _, path = path_socket
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.setblocking(False)
    try:
        for _ in range(100_000):
            filler.sendto(b"x" * 1024, path)
    except BlockingIOError:
        pass
    else:
        pytest.skip("the receive queue never filled")
    finally:
        filler.close()
    notifier = Notifier(path, watchdog_usec=1_000_000, timeout=0.3)
    start = time.monotonic()
    assert notifier.watchdog() is False
    assert time.monotonic() - start < 5


def test_unset_environment_hides_the_variables_from_children(monkeypatch, path_socket):
    sock, path = path_socket
    environment(monkeypatch, path)
    notifier = Notifier.from_environment(unset_environment=True)
    assert not any(name in os.environ for name in NOTIFY_VARIABLES)
    assert notifier.watchdog() is True  # the notifier keeps what it read
    assert receive(sock) == "WATCHDOG=1"


def test_child_environment_strips_the_variables(monkeypatch):
    environment(monkeypatch, "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_EXTRA", "1")
    monkeypatch.setenv("MERGEOPS_HOME", "/var/lib/mergeops")
    env = child_environment()
    assert not any(name.startswith("WATCHDOG_") or name == "NOTIFY_SOCKET" for name in env)
    assert env["MERGEOPS_HOME"] == "/var/lib/mergeops"
    assert os.environ["NOTIFY_SOCKET"] == "/run/systemd/notify"  # os.environ itself is untouched
    assert child_environment({"NOTIFY_SOCKET": "@x", "WATCHDOG_PID": "1", "PATH": "/bin"}) == {"PATH": "/bin"}
    out = subprocess.run(["env"], env=env, capture_output=True, text=True, timeout=30, check=True).stdout
    assert "NOTIFY_SOCKET=" not in out and "WATCHDOG_USEC=" not in out


# --- the unit file ---


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_declares_what_spec_section_7_asks_for():
    s = unit_settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["ExecStart"] == [f"{EXEC_PATH} daemon --policy /etc/mergeops/policy.toml"]
    assert s["WatchdogSec"] == ["120"] and s["Restart"] == ["on-failure"]
    assert s["StateDirectory"] == ["mergeops"] and "MERGEOPS_HOME=%S/mergeops" in s["Environment"]
    assert s["LoadCredential"] == ["hf_token:/etc/mergeops/hf_token"]
    assert s["ProtectSystem"] == ["strict"] and s["NoNewPrivileges"] == ["yes"]
    assert s["CapabilityBoundingSet"] == [""] and s["UMask"] == ["0027"]
    assert "MemoryDenyWriteExecute" not in s  # PyTorch's CPU kernels are JIT-compiled into executable pages


def systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        message = f"systemd-analyze is missing; install it with: {APT_INSTALL}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (in .ci/run)")
        pytest.skip(message)
    return exe


def test_unit_passes_systemd_analyze_verify(tmp_path):
    exe = systemd_analyze()
    # verify fails when ExecStart's binary is missing, and /usr/local/bin/mergeops exists only once installed:
    # verify a copy whose ExecStart points at an executable stub, everything else byte for byte the same.
    text = UNIT.read_text()
    assert text.count(f"ExecStart={EXEC_PATH} ") == 1
    stub = tmp_path / "mergeops"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / "mergeops.service"
    unit.write_text(text.replace(f"ExecStart={EXEC_PATH} ", f"ExecStart={stub} "))
    result = subprocess.run([exe, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60,
                            env={**child_environment(), "SYSTEMD_LOG_LEVEL": "info", "SYSTEMD_PAGER": "cat"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Unknown or misspelt keys are only warnings: any line about our unit means verify found something.
    complaints = [line for line in output.splitlines() if "mergeops.service" in line]
    assert complaints == [], output


def test_systemd_analyze_verify_catches_a_bad_unit(tmp_path):
    """The check above can fail: a misspelt directive and a missing binary are both reported."""
    exe = systemd_analyze()
    unit = tmp_path / "mergeops.service"
    unit.write_text(UNIT.read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"))
    result = subprocess.run([exe, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60,
                            env={**child_environment(), "SYSTEMD_LOG_LEVEL": "info", "SYSTEMD_PAGER": "cat"})
    output = result.stdout + result.stderr
    assert result.returncode != 0 or "NoNewPrivilege" in output
    assert "NoNewPrivilege" in output
