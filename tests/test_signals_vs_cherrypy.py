"""busd's SignalHandler side by side with CherryPy's, the reference.

Each scenario runs twice in child processes: once with CherryPy's
``wspbus.Bus`` and ``plugins.SignalHandler``, once with busd's, and both
runs must give the same observable results: which listeners ran (and on
which thread), whether and how the process re-executed itself, its PIDs and
its exit status. The signals are real, sent with ``os.kill``; a terminal is
a real pseudo-terminal on the child's stdin.

The one deliberate difference (docs/bus.md) is not observable here: busd's
OS handler only records the signal, and the listeners run on the next
``main`` tick of ``block()``, which the handler wakes at once; CherryPy runs
them inside the OS handler. Both run on the main thread.
"""

from __future__ import annotations

import json
import os
import pty
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from cherrypy.process.plugins import SignalHandler as CherryPySignalHandler
from cherrypy.process.wspbus import Bus as CherryPyBus
from helpers import default_sigint

from busd.bus import Bus as BusdBus
from busd.plugins.signals import SignalHandler as BusdSignalHandler

IMPL = ("busd", "cherrypy")

REPO = str(Path(__file__).resolve().parent.parent)

# Bounds for anything that waits on a child. Generous: a test only takes
# this long when it is about to fail anyway.
DEADLINE = 15.0

# One scenario in its own process; every event is a JSON line on stdout.
# argv: IMPL [--fork] [--usr2]. With --fork, the process forks once the
# SignalHandler is made and the parent only waits for its child and ends
# with its status: the child has a new PID, as after daemonizing (CherryPy
# calls a process daemonized only then). SIGNALS_TEST_GEN counts the runs
# of the script in one process chain: a re-exec keeps the environment.
CHILD = r"""
import json, os, sys, threading

impl = sys.argv[1]
if impl == "busd":
    from busd.bus import Bus
    from busd.plugins import SignalHandler
else:
    from cherrypy.process.wspbus import Bus
    from cherrypy.process.plugins import SignalHandler


def emit(*item):
    # One write(2) per line: a line logged from a signal handler never
    # lands inside another.
    os.write(1, (json.dumps(item) + "\n").encode())


def on_main_thread():
    return threading.current_thread() is threading.main_thread()


generation = int(os.environ.get("SIGNALS_TEST_GEN", "0")) + 1
os.environ["SIGNALS_TEST_GEN"] = str(generation)

bus = Bus()
bus.subscribe("log", lambda msg, level: emit("log", msg))
handler = SignalHandler(bus)
if "--usr2" in sys.argv:
    # Both ways CherryPy offers: an entry in handlers before subscribe(),
    # and code that listens on the channel of a signal set_handler() added.
    handler.handlers["SIGUSR2"] = lambda: emit("SIGUSR2 handler", on_main_thread())
    # Priority 40: before bus.graceful, in both (CherryPy keeps no order
    # among equal priorities).
    bus.subscribe(
        "SIGUSR1", lambda: emit("SIGUSR1 listener", on_main_thread()), priority=40
    )
handler.subscribe()
if "--usr2" in sys.argv:
    bus.subscribe("SIGWINCH", lambda: emit("SIGWINCH listener", on_main_thread()))
    handler.set_handler("SIGWINCH")

if "--fork" in sys.argv:
    child = os.fork()
    if child:
        _, status = os.waitpid(child, 0)
        os._exit(os.waitstatus_to_exitcode(status))

bus.subscribe("graceful", lambda: emit("graceful", on_main_thread()))
bus.subscribe("exit", lambda: emit("exit", on_main_thread()))
bus.start()
emit("started", generation, os.getpid(), os.isatty(0), sys.argv[2:])
bus.block(interval=0.05)
emit("block returned", generation)
"""


class Child:
    """A scenario's process chain, its stdout read line by line with deadlines."""

    def __init__(self, script: str, impl: str, *args: str, stdin: int) -> None:
        env = {k: v for k, v in os.environ.items() if k != "SIGNALS_TEST_GEN"}
        # The busd of this checkout, whatever the virtualenv has installed.
        env["PYTHONPATH"] = os.pathsep.join(
            [REPO, *filter(None, [env.get("PYTHONPATH")])]
        )
        self.proc = subprocess.Popen(
            [sys.executable, script, impl, *args],
            stdin=stdin,
            stdout=subprocess.PIPE,
            env=env,
            cwd=os.path.dirname(script),
            preexec_fn=default_sigint,
            # Its own process group, so that teardown can end a run whose
            # PID it never read (a re-executed run forks a new one).
            start_new_session=True,
        )
        #: Every PID the chain reported, in order: the newest is the deepest.
        self.pids: list[int] = []
        self.events: list[list[Any]] = []
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _next(self, deadline: float) -> list[Any] | None:
        line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        if line is None:
            self._lines.put(None)  # the end stays the end
            return None
        event: list[Any] = json.loads(line)
        if event[0] == "started":
            self.pids.append(event[2])
        self.events.append(event)
        return event

    def started(self, generation: int) -> int:
        """Wait until run ``generation`` has started its bus; its PID."""
        deadline = time.monotonic() + DEADLINE
        while True:
            try:
                event = self._next(deadline)
            except queue.Empty:
                pytest.fail(f"run {generation} did not start in time: {self.events}")
            if event is None:
                pytest.fail(f"output ended before run {generation}: {self.events}")
            if event[0] == "started" and event[1] == generation:
                return int(event[2])

    def wait_for(self, wanted: list[Any]) -> None:
        """Read until the event ``wanted`` has been seen; fail at the deadline."""
        deadline = time.monotonic() + DEADLINE
        while wanted not in self.events:
            try:
                event = self._next(deadline)
            except queue.Empty:
                pytest.fail(f"no {wanted!r} in time: {self.events}")
            if event is None:
                pytest.fail(f"output ended before {wanted!r}: {self.events}")

    def finish(self) -> tuple[int, list[list[Any]]]:
        """Wait for the chain to end; its exit status and every event."""
        deadline = time.monotonic() + DEADLINE
        try:
            while self._next(deadline) is not None:
                pass
            returncode = self.proc.wait(max(0.0, deadline - time.monotonic()))
        except (queue.Empty, subprocess.TimeoutExpired):
            pytest.fail(f"the child did not end in time: {self.events}")
        return returncode, self.events

    def kill(self) -> None:
        """End every process of the chain that still runs.

        The chain is this child and its descendants: the process group it
        leads, which nothing else joins.
        """
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(DEADLINE)
        self._reader.join(DEADLINE)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("signals_child") / "child.py"
    path.write_text(CHILD)
    return str(path)


@contextmanager
def children(
    script: str, *args: str, stdin: int = subprocess.DEVNULL
) -> Iterator[dict[str, Child]]:
    """The scenario under both implementations at once; kill leftovers."""
    started = {impl: Child(script, impl, *args, stdin=stdin) for impl in IMPL}
    try:
        yield started
    finally:
        for child in started.values():
            child.kill()


def observed(child: Child) -> tuple[int, list[list[Any]]]:
    """What must match across implementations: the status and the events,
    with each PID named by its run, and of the log only the signals caught.
    """
    returncode, events = child.finish()
    kept = []
    for event in events:
        if event[0] == "log":
            if event[1].startswith("Caught signal"):
                kept.append(event)
        elif event[0] == "started":
            kept.append([*event[:2], f"PID of run {child.pids.index(event[2]) + 1}",
                         *event[3:]])  # fmt: skip
        else:
            kept.append(event)
    return returncode, kept


def same_in_both(started: dict[str, Child]) -> tuple[int, list[list[Any]]]:
    results = {impl: observed(child) for impl, child in started.items()}
    assert results["busd"] == results["cherrypy"]
    return results["busd"]


def test_sigterm_exits(script):
    with children(script) as started:
        for child in started.values():
            os.kill(child.started(1), signal.SIGTERM)
        returncode, events = same_in_both(started)
    assert returncode == 0
    assert events == [
        ["started", 1, "PID of run 1", False, []],
        ["log", "Caught signal SIGTERM."],
        ["exit", True],
        ["block returned", 1],
    ]


def test_sigusr1_is_a_graceful_reload(script):
    with children(script) as started:
        for child in started.values():
            pid = child.started(1)
            os.kill(pid, signal.SIGUSR1)
        for child in started.values():
            # The reload does not end the process; SIGTERM then does.
            child.wait_for(["graceful", True])
            assert child.proc.poll() is None
            os.kill(child.pids[0], signal.SIGTERM)
        returncode, events = same_in_both(started)
    assert returncode == 0
    assert events == [
        ["started", 1, "PID of run 1", False, []],
        ["log", "Caught signal SIGUSR1."],
        ["graceful", True],
        ["log", "Caught signal SIGTERM."],
        ["exit", True],
        ["block returned", 1],
    ]


def test_signal_channels_reach_their_listeners(script):
    # handlers["SIGUSR2"], a listener on the SIGUSR1 channel beside the
    # default graceful, and a listener on SIGWINCH's channel after
    # set_handler("SIGWINCH"): each runs, on the main thread.
    sent = (signal.SIGUSR2, signal.SIGUSR1, signal.SIGWINCH)
    # The next signal goes once the last listener of this one ran: CherryPy
    # would run it nested inside this one's listeners (busd after them).
    last = ("SIGUSR2 handler", "graceful", "SIGWINCH listener")
    with children(script, "--usr2") as started:
        for child in started.values():
            pid = child.started(1)
            for signum, name in zip(sent, last, strict=True):
                os.kill(pid, signum)
                child.wait_for([name, True])
            os.kill(pid, signal.SIGTERM)
        returncode, events = same_in_both(started)
    assert returncode == 0
    assert events == [
        ["started", 1, "PID of run 1", False, ["--usr2"]],
        ["log", "Caught signal SIGUSR2."],
        ["SIGUSR2 handler", True],
        ["log", "Caught signal SIGUSR1."],
        ["SIGUSR1 listener", True],
        ["graceful", True],
        ["log", "Caught signal SIGWINCH."],
        ["SIGWINCH listener", True],
        ["log", "Caught signal SIGTERM."],
        ["exit", True],
        ["block returned", 1],
    ]


def test_sighup_when_daemonized_re_executes_with_a_new_pid(script):
    # Forked away from where the plugin was made, no terminal on stdin:
    # SIGHUP restarts the bus, and block() re-executes the process. The new
    # run forks again (as a daemonizing program does), so the PID differs,
    # as CherryPy's own test_SIGHUP_daemonized expects.
    with children(script, "--fork") as started:
        pids = {}
        for impl, child in started.items():
            pids[impl] = child.started(1)
            os.kill(pids[impl], signal.SIGHUP)
        for impl, child in started.items():
            second = child.started(2)
            assert second != pids[impl]
            os.kill(second, signal.SIGTERM)
        returncode, events = same_in_both(started)
    assert returncode == 0
    assert events == [
        ["started", 1, "PID of run 1", False, ["--fork"]],
        ["log", "Caught signal SIGHUP."],
        ["exit", True],
        ["started", 2, "PID of run 2", False, ["--fork"]],
        ["log", "Caught signal SIGTERM."],
        ["exit", True],
        ["block returned", 2],
    ]


def test_sighup_on_a_terminal_exits(script):
    # Forked as a daemon would, but stdin is a terminal: a terminal that
    # hangs up ends what runs in it.
    master, slave = pty.openpty()
    try:
        with children(script, "--fork", stdin=slave) as started:
            for child in started.values():
                os.kill(child.started(1), signal.SIGHUP)
            returncode, events = same_in_both(started)
    finally:
        os.close(master)
        os.close(slave)
    assert returncode == 0
    assert events == [
        ["started", 1, "PID of run 1", True, ["--fork"]],
        ["log", "Caught signal SIGHUP."],
        ["exit", True],
        ["block returned", 1],
    ]


def test_sighup_without_a_terminal_but_never_forked_exits(script):
    # No terminal, as under a CI system or a service manager, but never
    # daemonized: SIGHUP ends the process rather than re-executing it.
    with children(script) as started:
        for child in started.values():
            os.kill(child.started(1), signal.SIGHUP)
        returncode, events = same_in_both(started)
    assert returncode == 0
    assert events == [
        ["started", 1, "PID of run 1", False, []],
        ["log", "Caught signal SIGHUP."],
        ["exit", True],
        ["block returned", 1],
    ]


def test_an_alias_reaches_its_listener_in_busd_only():
    # Documented difference: SIGCLD is another name of SIGCHLD (ignored by
    # default, so harmless here). CherryPy subscribes the listener to a
    # "SIGCLD" channel but publishes "SIGCHLD": the listener never runs.
    calls: dict[str, int] = {}
    original = signal.getsignal(signal.SIGCHLD)
    pairs = (
        ("busd", BusdBus(), BusdSignalHandler),
        ("cherrypy", CherryPyBus(), CherryPySignalHandler),
    )
    for name, bus, handler_class in pairs:
        calls[name] = 0
        handler = handler_class(bus)
        try:
            handler.set_handler(
                "SIGCLD", lambda n=name: calls.__setitem__(n, calls[n] + 1)
            )
            os.kill(os.getpid(), signal.SIGCHLD)
            bus.publish("main")  # busd's tick; CherryPy acted in the handler
        finally:
            handler.unsubscribe()
            signal.signal(signal.SIGCHLD, original)
    assert calls == {"busd": 1, "cherrypy": 0}
