"""PIDFile: a real lock file in tmp_path, real rival processes."""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from busd.bus import Bus
from busd.plugins.pidfile import PIDFile, PIDFileError, read_pid

TIMEOUT = 15.0

# Takes the PID file, says so, then holds it until stdin closes (or a kill).
HOLDER = r"""
import sys
from busd.bus import Bus
from busd.plugins.pidfile import PIDFile

plugin = PIDFile(Bus(), sys.argv[1])
plugin.start()
print("HELD", flush=True)
sys.stdin.read()
plugin.exit()
"""

# Waits for a start time on stdin, spins until that moment (CLOCK_MONOTONIC
# is system-wide), then races for the PID file and reports.
RACER = r"""
import sys, time
from busd.bus import Bus
from busd.plugins.pidfile import PIDFile, PIDFileError

plugin = PIDFile(Bus(), sys.argv[1])
print("READY", flush=True)
go = float(sys.stdin.readline())
while time.monotonic() < go:
    pass
try:
    plugin.start()
except PIDFileError as error:
    print(f"LOST {error.pid} {error}", flush=True)
    sys.exit(0)
print("WON", flush=True)
sys.stdin.read()
plugin.exit()
"""


def read_line(proc: subprocess.Popen[str], timeout: float = TIMEOUT) -> str:
    """Read one line of ``proc``'s stdout, failing after ``timeout`` seconds."""
    box: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: box.put(stdout.readline()), daemon=True).start()
    try:
        return box.get(timeout=timeout).rstrip("\n")
    except queue.Empty:
        raise AssertionError(
            f"no line from PID {proc.pid} within {timeout} s"
        ) from None


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start a Python child; each one is killed by its PID at teardown."""
    started: list[subprocess.Popen[str]] = []

    def run(script: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        return proc

    yield run
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(TIMEOUT)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def test_start_writes_and_locks_exit_removes(tmp_path: Path, bus_log) -> None:
    bus, _ = bus_log
    path = tmp_path / "busd.pid"
    plugin = PIDFile(bus, path)
    plugin.subscribe()
    bus.start()
    try:
        assert path.read_text() == f"{os.getpid()}\n"
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        assert plugin.pid == os.getpid()
        assert plugin.holder() == os.getpid()  # the lock is held
        assert read_pid(path) == os.getpid()
        assert [p.name for p in tmp_path.iterdir()] == ["busd.pid"]  # no temp
    finally:
        bus.exit()
    assert not path.exists()
    assert plugin.pid is None
    assert plugin.holder() is None


def test_a_live_holder_is_a_clear_error(tmp_path: Path, spawn, bus_log) -> None:
    bus, _ = bus_log
    path = tmp_path / "busd.pid"
    holder = spawn(HOLDER, str(path))
    assert read_line(holder) == "HELD"
    plugin = PIDFile(bus, path)
    assert plugin.holder() == holder.pid
    with pytest.raises(PIDFileError) as caught:
        plugin.start()
    assert str(caught.value) == f"already running, PID {holder.pid} (PID file {path})"
    assert caught.value.pid == holder.pid
    assert isinstance(caught.value, RuntimeError)
    assert read_pid(path) == holder.pid  # untouched
    assert plugin.pid is None
    assert [p.name for p in tmp_path.iterdir()] == ["busd.pid"]  # temp cleaned
    # The holder removes its own file on the way out.
    holder.stdin.close()
    assert holder.wait(TIMEOUT) == 0
    assert not path.exists()


def test_a_stale_file_is_replaced(tmp_path: Path, spawn, bus_log) -> None:
    bus, log = bus_log
    path = tmp_path / "busd.pid"
    holder = spawn(HOLDER, str(path))
    assert read_line(holder) == "HELD"
    os.kill(holder.pid, signal.SIGKILL)  # dies holding it: no cleanup
    holder.wait(TIMEOUT)
    assert read_pid(path) == holder.pid
    plugin = PIDFile(bus, path)
    assert plugin.holder() is None  # nobody holds the lock: stale
    plugin.start()
    try:
        assert path.read_text() == f"{os.getpid()}\n"
        assert plugin.holder() == os.getpid()
        expected = (
            f"Replaced stale PID file {path} (PID {holder.pid} is no longer running)."
        )
        assert (expected, logging.INFO) in log
    finally:
        plugin.exit()
    assert not path.exists()


def test_garbage_in_an_unlocked_file_is_stale_too(tmp_path: Path, bus_log) -> None:
    bus, log = bus_log
    path = tmp_path / "busd.pid"
    path.write_text("not a pid\n")
    plugin = PIDFile(bus, path)
    plugin.start()
    try:
        assert read_pid(path) == os.getpid()
        expected = f"Replaced stale PID file {path} (it held no valid PID)."
        assert (expected, logging.INFO) in log
    finally:
        plugin.exit()


@pytest.mark.parametrize("stale", [False, True], ids=["no-file", "stale-file"])
def test_racing_starters_exactly_one_wins(tmp_path: Path, spawn, stale: bool) -> None:
    path = tmp_path / "busd.pid"
    if stale:
        dead = spawn(HOLDER, str(path))
        assert read_line(dead) == "HELD"
        os.kill(dead.pid, signal.SIGKILL)
        dead.wait(TIMEOUT)
    racers = [spawn(RACER, str(path)) for _ in range(4)]
    for racer in racers:
        assert read_line(racer) == "READY"
    go = time.monotonic() + 0.05
    for racer in racers:
        racer.stdin.write(f"{go}\n")
        racer.stdin.flush()
    results = {racer.pid: read_line(racer) for racer in racers}
    winners = [pid for pid, line in results.items() if line == "WON"]
    assert len(winners) == 1, results
    (winner,) = winners
    message = f"already running, PID {winner} (PID file {path})"
    for pid, line in results.items():
        if pid != winner:
            assert line == f"LOST {winner} {message}", results
    assert read_pid(path) == winner
    assert PIDFile(Bus(), path).holder() == winner
    assert [p.name for p in tmp_path.iterdir()] == ["busd.pid"]


def test_racing_threads_many_rounds(tmp_path: Path) -> None:
    """flock locks belong to open files, so threads race like processes do."""
    path = tmp_path / "busd.pid"
    for round_ in range(40):
        if round_ % 2:  # every other round starts from a stale file
            path.write_text("999999999\n")
        plugins = [PIDFile(Bus(), path) for _ in range(4)]
        barrier = threading.Barrier(len(plugins))
        outcomes: list[str] = []

        def race(
            plugin: PIDFile, barrier: threading.Barrier, outcomes: list[str]
        ) -> None:
            barrier.wait(TIMEOUT)
            try:
                plugin.start()
            except PIDFileError as error:
                outcomes.append(f"lost {error.pid}")
            else:
                outcomes.append("won")

        threads = [
            threading.Thread(target=race, args=(p, barrier, outcomes)) for p in plugins
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        assert sorted(outcomes) == ["lost " + str(os.getpid())] * 3 + ["won"]
        for plugin in plugins:
            plugin.exit()
        assert not path.exists()


def test_exit_leaves_a_file_that_is_no_longer_ours(tmp_path: Path, bus_log) -> None:
    bus, log = bus_log
    path = tmp_path / "busd.pid"
    plugin = PIDFile(bus, path)
    plugin.start()
    other = tmp_path / "other"
    other.write_text("4242\n")
    os.replace(other, path)  # someone else's file now sits at the path
    plugin.exit()
    assert path.read_text() == "4242\n"
    warnings = [m for m, level in log if level == logging.WARNING]
    assert any("no longer ours" in m for m in warnings), log


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_exit_after_privilege_drop_warns_and_leaves_it_unlocked() -> None:
    # The real deployment shape: root takes the file in a root-owned
    # directory, drops to nobody, and at exit may not unlink it any more.
    directory = tempfile.mkdtemp(prefix="busd-pidfile-")
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "busd.pid")
    script = r"""
import os, sys
from busd.bus import Bus
from busd.plugins.pidfile import PIDFile
from busd.plugins.privileges import DropPrivileges

bus = Bus()
bus.subscribe("log", lambda msg, level: print(level, msg, flush=True))
PIDFile(bus, sys.argv[1]).subscribe()
DropPrivileges(bus, user="nobody").subscribe()
bus.start()
bus.exit()
"""
    try:
        done = subprocess.run(
            [sys.executable, "-c", script, path],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{logging.WARNING} Could not remove PID file {path}" in done.stdout
        assert read_pid(path) is not None
        assert PIDFile(Bus(), path).holder() is None  # stale: next start wins
    finally:
        shutil.rmtree(directory)


def test_cherrypy_names_pidfile_and_finalized(tmp_path: Path, bus_log) -> None:
    bus, _ = bus_log
    relative = os.path.relpath(tmp_path / "app.pid")
    plugin = PIDFile(bus, pidfile=relative)
    assert plugin.pidfile == relative  # as given, as CherryPy keeps it
    assert plugin.path == str(tmp_path / "app.pid")
    assert plugin.finalized is False
    plugin.subscribe()
    bus.start()
    try:
        assert plugin.finalized is True
        assert (tmp_path / "app.pid").read_text() == f"{os.getpid()}\n"
    finally:
        bus.exit()
    assert plugin.finalized is False  # let go: a later start takes it again
    assert not (tmp_path / "app.pid").exists()


def test_path_stays_as_an_alias_of_pidfile(tmp_path: Path) -> None:
    path = tmp_path / "app.pid"
    assert PIDFile(Bus(), path=path).path == str(path)
    with pytest.raises(TypeError, match="pidfile or path, not both"):
        PIDFile(Bus(), path, path=path)
    with pytest.raises(TypeError, match=r"missing the PID file's path \(pidfile\)"):
        PIDFile(Bus())
