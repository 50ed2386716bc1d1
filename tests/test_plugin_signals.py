"""SignalHandler: real signals, recorded by the handler, acted on by ``main``."""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import default_sigint, wait_for

from busd.bus import states
from busd.plugins.signals import SignalHandler

# Generous: a deadline, not a sleep; a healthy run is far below it.
TIMEOUT = 15.0

# A bus with the SignalHandler at its defaults, its log printed to stdout,
# blocking in main. Options: --sigint (handled as busd the daemon does),
# --usr2 (a listener on the SIGUSR2 channel), --slow-stop, --interval S.
CHILD = r"""
import sys, threading, time
from busd.bus import Bus
from busd.plugins.signals import SignalHandler

bus = Bus()
bus.subscribe("log", lambda msg, level: print(msg, flush=True))
handler = SignalHandler(bus)
if "--sigint" in sys.argv:
    handler.handlers["SIGINT"] = bus.exit
handler.subscribe()

def on_graceful():
    print(f"graceful ran on {threading.current_thread().name}", flush=True)

bus.subscribe("graceful", on_graceful)

if "--usr2" in sys.argv:
    def on_usr2():
        print(f"SIGUSR2 listener ran on {threading.current_thread().name}", flush=True)
    bus.subscribe("SIGUSR2", on_usr2)
    handler.set_handler("SIGUSR2")

if "--slow-stop" in sys.argv:
    def slow_stop():
        # Exit is under way: wait until the test's next signal is recorded.
        print("stopping", flush=True)
        deadline = time.monotonic() + 15
        while handler.pending == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
    bus.subscribe("stop", slow_stop)

interval = 0.02
if "--interval" in sys.argv:
    interval = float(sys.argv[sys.argv.index("--interval") + 1])
bus.start()
bus.block(interval=interval)
print("block returned", flush=True)
"""


class Lines:
    """A child's output lines, read by a thread and awaited with a deadline."""

    def __init__(self, stream: Any) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def expect(self, text: str, timeout: float = TIMEOUT) -> str:
        """Return the first unread line containing ``text``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no {text!r} within {timeout} s: {self.seen}"
                ) from None
            if line is None:
                self._queue.put(None)
                raise AssertionError(f"output ended before {text!r}: {self.seen}")
            self.seen.append(line)
            if text in line:
                return line

    def rest(self) -> list[str]:
        """Every line up to the end of the output."""
        while (line := self._queue.get(timeout=TIMEOUT)) is not None:
            self.seen.append(line)
        self._queue.put(None)
        return self.seen


@pytest.fixture
def child() -> Iterator[Callable[..., tuple[subprocess.Popen[str], Lines]]]:
    """Start CHILD; every process started is killed by PID at teardown."""
    started: list[subprocess.Popen[str]] = []

    def spawn(*args: str) -> tuple[subprocess.Popen[str], Lines]:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=default_sigint,
        )
        started.append(proc)
        lines = Lines(proc.stdout)
        lines.expect("Bus STARTED")
        return proc, lines

    yield spawn
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(TIMEOUT)


# -- whole processes ------------------------------------------------------------


def test_sigterm_ends_the_bus_cleanly(child) -> None:
    proc, lines = child()
    os.kill(proc.pid, signal.SIGTERM)
    lines.expect("Caught signal SIGTERM.")
    lines.expect("Bus EXITED")
    assert proc.wait(TIMEOUT) == 0
    assert "block returned" in lines.rest()


def test_sigint_configured_as_the_daemon_does_exits_on_the_main_tick(child) -> None:
    proc, lines = child("--sigint")
    os.kill(proc.pid, signal.SIGINT)
    lines.expect("Caught signal SIGINT.")
    lines.expect("Bus EXITED")
    assert proc.wait(TIMEOUT) == 0
    output = lines.rest()
    assert "block returned" in output
    assert "Keyboard Interrupt: shutting down bus" not in output


def test_sigusr1_runs_graceful_on_the_main_thread(child) -> None:
    proc, lines = child()
    for _ in range(2):
        os.kill(proc.pid, signal.SIGUSR1)
        lines.expect("Caught signal SIGUSR1.")
        lines.expect("Bus graceful")
        lines.expect("graceful ran on MainThread")
    assert proc.poll() is None  # a reload does not end the process
    os.kill(proc.pid, signal.SIGTERM)
    lines.expect("Bus EXITED")
    assert proc.wait(TIMEOUT) == 0


def test_sighup_when_not_daemonized_exits(child) -> None:
    # stdin is /dev/null, no terminal; but the process never forked away
    # from where the plugin was made, so it is not a daemon: SIGHUP ends it.
    proc, lines = child()
    os.kill(proc.pid, signal.SIGHUP)
    lines.expect("Caught signal SIGHUP.")
    lines.expect("SIGHUP while not daemonized: exiting.")
    lines.expect("Bus EXITED")
    assert proc.wait(TIMEOUT) == 0
    output = lines.rest()
    assert "block returned" in output
    assert not any("graceful" in line for line in output), output


def test_a_listener_on_a_signal_channel_runs_on_the_main_thread(child) -> None:
    proc, lines = child("--usr2")
    os.kill(proc.pid, signal.SIGUSR2)
    lines.expect("Caught signal SIGUSR2.")
    lines.expect("SIGUSR2 listener ran on MainThread")
    assert proc.poll() is None
    os.kill(proc.pid, signal.SIGTERM)
    lines.expect("Bus EXITED")
    assert proc.wait(TIMEOUT) == 0


def test_a_signal_is_acted_on_at_once_not_at_the_next_tick(child) -> None:
    # With an hour between main ticks, only bus.wake() from the OS handler
    # can get the actions done within the deadline.
    proc, lines = child("--interval", "3600")
    os.kill(proc.pid, signal.SIGUSR1)
    lines.expect("graceful ran on MainThread")
    os.kill(proc.pid, signal.SIGTERM)
    lines.expect("Bus EXITED")
    assert proc.wait(TIMEOUT) == 0


def test_a_signal_during_exit_is_harmless(child) -> None:
    proc, lines = child("--slow-stop", "--sigint")
    os.kill(proc.pid, signal.SIGTERM)
    lines.expect("stopping")
    # Ctrl-C while the stop listeners run: recorded, not a KeyboardInterrupt.
    os.kill(proc.pid, signal.SIGINT)
    lines.expect("Ignoring SIGINT: the bus is already exiting.")
    assert proc.wait(TIMEOUT) == 0
    output = lines.rest()
    assert "block returned" in output
    assert not any("Traceback" in line for line in output), output


# -- the API, in this process ---------------------------------------------------


def test_default_handlers_are_cherrypys(bus_log) -> None:
    bus, _ = bus_log
    plugin = SignalHandler(bus)
    assert plugin.handlers == {
        "SIGTERM": bus.exit,
        "SIGHUP": plugin.handle_SIGHUP,
        "SIGUSR1": bus.graceful,
    }
    # SIGINT stays Python's: a KeyboardInterrupt, which block() turns into
    # an exit.
    before = signal.getsignal(signal.SIGINT)
    plugin.subscribe()
    try:
        assert signal.getsignal(signal.SIGINT) is before
        for name in plugin.handlers:
            assert plugin.handlers[name] in bus.listeners[name]
    finally:
        plugin.unsubscribe()


def test_signals_maps_every_number_to_its_name() -> None:
    signals = SignalHandler.signals
    assert signals[signal.SIGTERM] == "SIGTERM"
    assert signals[1] == "SIGHUP"
    assert signals[signal.SIGABRT] == "SIGABRT"
    assert set(signals) == {int(sig) for sig in signal.Signals}
    assert all(getattr(signal, name) == num for num, name in signals.items())


def test_set_handler_by_name_or_number_subscribes_the_listener(bus_log) -> None:
    bus, _ = bus_log
    plugin = SignalHandler(bus)  # never subscribe()d: set_handler is enough
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2)}
    calls: list[str] = []
    try:
        plugin.set_handler("SIGUSR2", lambda: calls.append("by name"))
        plugin.set_handler(int(signal.SIGUSR1), lambda: calls.append("by number"))
        for signum in (signal.SIGUSR1, signal.SIGUSR2):
            assert signal.getsignal(signum) not in (before[signum], None)
        assert len(bus.listeners["SIGUSR2"]) == 1
        assert len(bus.listeners["SIGUSR1"]) == 1
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)
        wait_for(lambda: plugin.pending == 2)
        bus.publish("main")
        assert calls == ["by name", "by number"]
        # Without a listener: the OS handler only, and code that listens on
        # the channel itself is called.
        plugin.set_handler(signal.SIGWINCH)
        bus.subscribe("SIGWINCH", lambda: calls.append("SIGWINCH channel"))
        os.kill(os.getpid(), signal.SIGWINCH)
        wait_for(lambda: plugin.pending == 1)
        bus.publish("main")
        assert calls[-1] == "SIGWINCH channel"
    finally:
        plugin.unsubscribe()
    for signum in (signal.SIGUSR1, signal.SIGUSR2):
        assert signal.getsignal(signum) is before[signum]


def test_set_handler_refuses_an_unknown_signal(bus_log) -> None:
    bus, _ = bus_log
    plugin = SignalHandler(bus)
    for bad in ("SIGNOPE", "SIG_DFL", 0, 9999):
        with pytest.raises(ValueError, match=f"No such signal: {bad!r}"):
            plugin.set_handler(bad, lambda: None)
    assert not any(name.startswith("SIG") for name in bus.listeners)


def test_an_alias_name_publishes_the_signals_own_channel(bus_log) -> None:
    bus, _ = bus_log
    plugin = SignalHandler(bus)
    calls: list[str] = []
    try:
        plugin.set_handler("SIGIOT", lambda: calls.append("listener"))
        # SIGIOT is another name of SIGABRT, whose channel is published.
        assert len(bus.listeners["SIGABRT"]) == 1
        plugin.handle(signal.SIGABRT)
        bus.publish("main")
        assert calls == ["listener"]
    finally:
        plugin.unsubscribe()


def test_unknown_names_in_handlers_are_skipped_with_a_warning(bus_log) -> None:
    bus, log = bus_log
    plugin = SignalHandler(bus)
    plugin.handlers = {"SIGNOPE": lambda: None, "SIGUSR2": lambda: None}
    plugin.subscribe()
    try:
        assert ("SignalHandler: no signal SIGNOPE on this platform; skipped.",
                logging.WARNING) in log  # fmt: skip
        assert "SIGUSR2" in bus.listeners
    finally:
        plugin.unsubscribe()


def test_the_handler_records_and_the_main_tick_acts(bus_log) -> None:
    bus, log = bus_log
    plugin = SignalHandler(bus)
    calls: list[tuple[threading.Thread, bool]] = []
    in_main_tick = [False]
    bus.subscribe("main", lambda: in_main_tick.__setitem__(0, True), priority=0)
    bus.subscribe("main", lambda: in_main_tick.__setitem__(0, False), priority=99)

    def action() -> None:
        calls.append((threading.current_thread(), in_main_tick[0]))

    plugin.handlers["SIGUSR1"] = action
    plugin.subscribe()
    try:
        assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None)
        os.kill(os.getpid(), signal.SIGUSR1)
        wait_for(lambda: plugin.pending == 1)
        assert calls == []  # the OS handler only recorded the signal
        bus.publish("main")
        assert calls == [(threading.main_thread(), True)]
        assert plugin.pending == 0
        assert ("Caught signal SIGUSR1.", logging.INFO) in log
    finally:
        plugin.unsubscribe()


def test_sigterm_exits_the_bus_from_the_main_tick_and_restores(bus_log) -> None:
    bus, log = bus_log
    previous = signal.getsignal(signal.SIGTERM)
    plugin = SignalHandler(bus)
    plugin.subscribe()
    exited_on: list[threading.Thread] = []
    bus.subscribe("exit", lambda: exited_on.append(threading.current_thread()))
    try:
        bus.start()
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, previous)
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(lambda: plugin.pending == 1)
        assert bus.state is states.STARTED  # nothing happened in the handler
        bus.publish("main")
        assert bus.state is states.EXITING
        assert exited_on == [threading.main_thread()]
        assert ("Caught signal SIGTERM.", logging.INFO) in log
        # The exit channel handed SIGTERM back to its previous handler.
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        plugin.unsubscribe()
        if bus.state is not states.EXITING:
            bus.exit()


def test_sighup_in_a_process_that_never_forked_exits_the_bus(bus_log) -> None:
    bus, log = bus_log
    plugin = SignalHandler(bus)
    bus.subscribe("main", plugin.main)
    bus.subscribe("SIGHUP", plugin.handlers["SIGHUP"])
    bus.start()
    try:
        plugin.handle(signal.SIGHUP)
        bus.publish("main")
        assert bus.state is states.EXITING
        assert bus.execv is False  # no re-exec
        assert ("SIGHUP while not daemonized: exiting.", logging.INFO) in log
    finally:
        if bus.state is not states.EXITING:
            bus.exit()


def test_unsubscribe_restores_the_previous_handlers(bus_log) -> None:
    bus, _ = bus_log
    names = ("SIGTERM", "SIGHUP", "SIGUSR1")
    hits: list[int] = []

    def previous_usr1(signum: int, frame: Any) -> None:
        hits.append(signum)

    original_usr1 = signal.signal(signal.SIGUSR1, previous_usr1)
    try:
        before = {name: signal.getsignal(getattr(signal, name)) for name in names}
        plugin = SignalHandler(bus)
        plugin.subscribe()
        for name in names:
            assert signal.getsignal(getattr(signal, name)) is not before[name]
        plugin.unsubscribe()
        after = {name: signal.getsignal(getattr(signal, name)) for name in names}
        assert after == before
        assert plugin.main not in bus.listeners["main"]
        # As in CherryPy, the listeners stay on their channels.
        assert bus.graceful in bus.listeners["SIGUSR1"]
        os.kill(os.getpid(), signal.SIGUSR1)
        wait_for(lambda: hits == [signal.SIGUSR1])
        assert plugin.pending == 0
    finally:
        signal.signal(signal.SIGUSR1, original_usr1)


def test_subscribe_off_the_main_thread_installs_nothing(bus_log) -> None:
    bus, log = bus_log
    before = signal.getsignal(signal.SIGTERM)
    plugin = SignalHandler(bus)
    seen: list[str] = []
    plugin.handlers["SIGHUP"] = lambda: seen.append("hup")
    thread = threading.Thread(target=plugin.subscribe, name="not-main")
    thread.start()
    thread.join(TIMEOUT)
    try:
        assert signal.getsignal(signal.SIGTERM) is before
        warnings = [m for m, level in log if level == logging.WARNING]
        assert any("not-main" in m and "main thread" in m for m in warnings), log
        # The listeners are subscribed: handle() reaches them at the tick.
        plugin.handle(signal.SIGHUP)
        bus.publish("main")
        assert seen == ["hup"]
    finally:
        plugin.unsubscribe()


def test_one_publish_per_signal_and_a_failing_listener_is_logged(bus_log) -> None:
    bus, log = bus_log
    plugin = SignalHandler(bus)
    seen: list[str] = []

    def broken() -> None:
        raise ValueError("reload failed")

    bus.subscribe("SIGHUP", broken)
    bus.subscribe("SIGUSR2", lambda: seen.append("usr2"))
    bus.subscribe("main", plugin.main)  # handle() needs no OS handler
    for signum in (signal.SIGHUP, signal.SIGUSR2, signal.SIGUSR2):
        plugin.handle(signum)
    bus.publish("main")  # the failure does not escape the main tick
    assert seen == ["usr2", "usr2"]
    errors = [m for m, level in log if level == logging.ERROR]
    assert any("'SIGHUP' listener" in m and "reload failed" in m for m in errors)
    assert "The action for SIGHUP failed." in errors
    plugin.handle(signal.SIGWINCH)  # nobody listens on its channel
    bus.publish("main")
    assert any("No action configured for SIGWINCH" in m for m, _ in log)


def test_set_handler_twice_still_restores_the_first_handler(bus_log) -> None:
    bus, _ = bus_log
    original = signal.getsignal(signal.SIGUSR2)
    plugin = SignalHandler(bus)
    try:
        plugin.set_handler("SIGUSR2")
        plugin.set_handler(signal.SIGUSR2)  # must not record ours as previous
    finally:
        plugin.unsubscribe()
    assert signal.getsignal(signal.SIGUSR2) is original


def test_a_handler_someone_else_installed_is_left_in_place(bus_log) -> None:
    bus, log = bus_log
    original = signal.getsignal(signal.SIGUSR2)

    def theirs(signum: int, frame: Any) -> None:
        return None

    plugin = SignalHandler(bus)
    try:
        plugin.set_handler("SIGUSR2")
        signal.signal(signal.SIGUSR2, theirs)
        plugin.unsubscribe()
        assert signal.getsignal(signal.SIGUSR2) is theirs
        assert (
            "SignalHandler: the SIGUSR2 handler was replaced by someone else; "
            "leaving it in place.",
            logging.WARNING,
        ) in log
    finally:
        signal.signal(signal.SIGUSR2, original)
