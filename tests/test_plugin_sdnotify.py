"""SdNotify against a real AF_UNIX datagram socket standing in for systemd."""

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from helpers import record_log

from busd import Bus
from busd.plugins.sdnotify import (
    START_PRIORITY,
    SdNotify,
    monotonic_usec,
    notify,
    unset_environment,
)

DEADLINE = 10.0  # for a message that must come
QUIET = 0.15  # for a message that must not come


@pytest.fixture(autouse=True)
def no_inherited_systemd(monkeypatch):
    """Tests run under systemd must not talk to the real one."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


class Listener:
    """The systemd end of the protocol: a bound datagram socket."""

    def __init__(self, address):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)

    def next(self, timeout=DEADLINE, skip_watchdog=False):
        """Return the lines of the next message, waiting at most ``timeout``."""
        self.sock.settimeout(timeout)
        while True:
            lines = self.sock.recv(4096).decode().split("\n")
            if not (skip_watchdog and lines == ["WATCHDOG=1"]):
                return lines

    def expect_nothing(self, within=QUIET):
        self.sock.settimeout(within)
        with pytest.raises(TimeoutError):
            lines = self.next(within)
            pytest.fail(f"unexpected message {lines}")

    def close(self):
        self.sock.close()


def short_dir(tmp_path):
    """tmp_path, unless it is too long for an AF_UNIX path (108 bytes)."""
    if len(os.fsencode(tmp_path)) < 90:
        return tmp_path
    return Path(tempfile.mkdtemp(prefix="sdn"))


@pytest.fixture
def listener(tmp_path, monkeypatch):
    path = str(short_dir(tmp_path) / "notify")
    listener = Listener(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield listener
    listener.close()
    if os.path.exists(path):
        os.unlink(path)


def marker(name):
    """A listener that sends X-MARKER=name through the same socket."""
    return lambda: notify(f"X-MARKER={name}")


def test_ready_reloading_stopping_in_order_around_other_listeners(listener):
    bus = Bus()
    log = record_log(bus)
    SdNotify(bus).subscribe()
    bus.subscribe("start", marker("start-50"), priority=50)
    bus.subscribe("start", marker("start-80"), priority=80)
    bus.subscribe("graceful", marker("graceful-50"), priority=50)
    bus.subscribe("stop", marker("stop-50"), priority=50)
    assert START_PRIORITY > 80

    bus.start()
    assert listener.next() == ["X-MARKER=start-50"]
    assert listener.next() == ["X-MARKER=start-80"]
    assert listener.next() == ["READY=1", f"MAINPID={os.getpid()}", "STATUS=Running"]

    before = monotonic_usec()
    bus.graceful()
    reloading = listener.next()
    assert reloading[0] == "RELOADING=1"
    key, value = reloading[1].split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= monotonic_usec()
    assert reloading[2:] == ["STATUS=Reloading"]
    assert listener.next() == ["X-MARKER=graceful-50"]
    assert listener.next() == ["READY=1", "STATUS=Running"]

    bus.exit()
    assert listener.next() == ["STOPPING=1", "STATUS=Stopping"]
    assert listener.next() == ["X-MARKER=stop-50"]
    listener.expect_nothing()
    assert not [m for m, level in log if level >= logging.WARNING]


def test_abstract_namespace_socket(monkeypatch):
    name = f"busd-test-{uuid.uuid4().hex}"
    listener = Listener("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        bus = Bus()
        SdNotify(bus).subscribe()
        bus.start()
        assert listener.next()[0] == "READY=1"
        assert notify("STATUS=one-off") is True
        assert listener.next() == ["STATUS=one-off"]
        bus.exit()
        assert listener.next()[0] == "STOPPING=1"
    finally:
        listener.close()


def test_status_sends_one_line(listener):
    plugin = SdNotify(Bus())
    assert plugin.status("serving 3 brokers\nall healthy") is True
    assert listener.next() == ["STATUS=serving 3 brokers all healthy"]


def test_watchdog_pings_at_half_the_period_until_exit(listener, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "20000")  # ping every 10 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    bus = Bus()
    plugin = SdNotify(bus)
    plugin.subscribe()
    assert plugin.watchdog_interval() == pytest.approx(0.01)
    started = time.monotonic()
    bus.start()
    assert listener.next()[0] == "READY=1"
    arrivals = []
    for _ in range(6):
        assert listener.next() == ["WATCHDOG=1"]
        arrivals.append(time.monotonic())
    # Six pings take five periods at least (less clock slop), counted from
    # before the start: a late read here can only make that longer, where
    # the span between two reads could shrink. (A busy loop of pings would
    # take microseconds.)
    assert arrivals[-1] - started >= 5 * 0.01 * 0.8
    # A sanity bound (the span is about 50 ms, up to a few hundred on a
    # loaded machine): 5 s only fails if the period is read in a wrong unit.
    assert arrivals[-1] - arrivals[0] < 5.0
    task = plugin.watchdog
    assert task.is_alive() and task.daemon

    bus.exit()
    assert listener.next(skip_watchdog=True)[0] == "STOPPING=1"
    listener.expect_nothing(within=10 * 0.01)  # no ping after STOPPING=1
    assert plugin.watchdog is None
    assert not task.is_alive()


def test_watchdog_pid_of_another_process_means_no_pings(listener, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "20000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    bus = Bus()
    plugin = SdNotify(bus)
    plugin.subscribe()
    bus.start()
    assert listener.next()[0] == "READY=1"
    listener.expect_nothing()
    assert plugin.watchdog is None
    bus.exit()


def test_unusable_watchdog_usec_is_logged_and_ignored(listener, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "soon")
    bus = Bus()
    log = record_log(bus)
    plugin = SdNotify(bus)
    plugin.subscribe()
    bus.start()
    assert listener.next()[0] == "READY=1"
    assert plugin.watchdog is None
    assert any(
        "WATCHDOG_USEC='soon'" in m and level == logging.WARNING for m, level in log
    )
    bus.exit()


def test_without_notify_socket_nothing_happens(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "20000")  # ignored without a socket
    bus = Bus()
    log = record_log(bus)
    plugin = SdNotify(bus)
    plugin.subscribe()
    assert not plugin.enabled
    bus.start()
    bus.graceful()
    assert plugin.status("anything") is False
    assert plugin.watchdog is None
    bus.exit()
    assert notify("READY=1") is False
    assert not [m for m, level in log if level >= logging.WARNING]


def test_lost_socket_is_one_warning_and_no_exception(listener):
    bus = Bus()
    log = record_log(bus)
    plugin = SdNotify(bus)
    plugin.subscribe()
    bus.start()
    assert listener.next()[0] == "READY=1"

    listener.close()
    os.unlink(listener.address)  # systemd went away
    bus.graceful()  # two messages, both lost
    assert plugin.status("still here") is False
    with pytest.raises(OSError):
        notify("STATUS=one-off")  # the plain function does raise
    warnings = [m for m, level in log if level == logging.WARNING]
    assert len(warnings) == 1
    assert listener.address in warnings[0]

    # Back again: messages get through, and a new loss is reported again.
    back = Listener(listener.address)
    try:
        assert plugin.status("reconnected") is True
        assert back.next() == ["STATUS=reconnected"]
    finally:
        back.close()
    bus.exit()  # the socket is closed but still exists: ECONNREFUSED
    assert len([m for m, level in log if level == logging.WARNING]) == 2


def test_unset_environment(listener, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    bus = Bus()
    plugin = SdNotify(bus, unset_environment=True)
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        assert name not in os.environ  # children won't inherit them
    plugin.subscribe()
    bus.start()  # the plugin kept what it read
    assert listener.next()[0] == "READY=1"
    assert plugin.watchdog is not None
    assert notify("READY=1") is False  # the process-wide function no longer
    bus.exit()
    assert listener.next()[0] == "STOPPING=1"

    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    unset_environment()
    assert "NOTIFY_SOCKET" not in os.environ


DAEMON = textwrap.dedent(
    """
    import signal

    from busd import Bus
    from busd.plugins.sdnotify import SdNotify

    bus = Bus()
    SdNotify(bus).subscribe()
    requested = []
    # The handler only records; the main loop turns it into exit().
    signal.signal(signal.SIGTERM, lambda signum, frame: requested.append(signum))


    @bus.subscribe("main")
    def act_on_signals():
        if requested:
            bus.exit()


    bus.start()
    bus.block(interval=0.05)
    """
)


def test_real_process_ready_then_stopping_on_sigterm(listener, tmp_path):
    script = tmp_path / "notifying_bus.py"  # not daemon.py: python-daemon
    script.write_text(DAEMON)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env={**os.environ, "NOTIFY_SOCKET": listener.address},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        ready = listener.next(timeout=60)  # a cold interpreter on a busy box
        assert ready[:2] == ["READY=1", f"MAINPID={proc.pid}"]
        os.kill(proc.pid, signal.SIGTERM)
        assert listener.next()[0] == "STOPPING=1"
        output = proc.communicate(timeout=30)[0].decode()
        assert proc.returncode == 0, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
