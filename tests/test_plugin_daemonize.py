"""Daemonizer: a real double fork, found through its PID file, ended by PID."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from helpers import (
    SYSTEMD_VARIABLES,
    busctl_env,
    reap,
    subreaper,
    wait_for,
    without_systemd_environment,
)

from busd.bus import Bus, states
from busd.plugins.daemonize import START_PRIORITY, Daemonizer
from busd.plugins.pidfile import PIDFile

TIMEOUT = 15.0

# A bus that daemonizes, then takes its PID file and blocks until SIGTERM.
# argv: stdout path (relative: resolved in the launcher's cwd), PID file,
# a file to keep open across daemonizing.
DAEMON = r"""
import os, sys
from busd.bus import Bus
from busd.plugins.daemonize import Daemonizer
from busd.plugins.pidfile import PIDFile
from busd.plugins.signals import SignalHandler

out, pidfile, kept_path = sys.argv[1:4]
kept = open(kept_path, "w")
bus = Bus()
bus.subscribe("log", lambda msg, level: print(msg, flush=True))
SignalHandler(bus).subscribe()
Daemonizer(
    bus,
    stdout=out,
    stderr=out,
    working_directory="/",
    umask=0o027,
    close_inherited=True,
    files_preserve=[kept],
).subscribe()
PIDFile(bus, pidfile).subscribe()

def after_detaching():
    kept.write(f"kept {os.getpid()}\n")
    kept.flush()

bus.subscribe("start", after_detaching, priority=80)
bus.start()
bus.block(interval=0.02)
"""

# A program that opens its log file before daemonizing, as most do: a
# logging.FileHandler, then Daemonizer (with the options in argv[3]) and a
# PID file. argv[4] is a descriptor the launcher passed down.
LOGGING_DAEMON = r"""
import json, logging, os, sys
from busd.bus import Bus
from busd.plugins.daemonize import Daemonizer
from busd.plugins.pidfile import PIDFile
from busd.plugins.signals import SignalHandler

log_path, pidfile, options, inherited = sys.argv[1:5]
logger = logging.getLogger("app")
logger.addHandler(logging.FileHandler(log_path))
logger.setLevel(logging.INFO)
bus = Bus()
bus.subscribe("log", lambda msg, level: logger.info(msg))
SignalHandler(bus).subscribe()
Daemonizer(bus, **json.loads(options)).subscribe()
PIDFile(bus, pidfile).subscribe()
bus.subscribe(
    "start", lambda: logger.info("after detaching: PID %d", os.getpid()), priority=80
)
bus.start()
bus.block(interval=0.02)
"""

# What busd the daemon asks for (busd/cli.py), next to CherryPy's defaults.
BUSD_DAEMON_OPTIONS = {
    "working_directory": "/",
    "umask": 0o022,
    "close_inherited": True,
}


def test_daemonizes_into_a_new_session(tmp_path: Path) -> None:
    pidfile = tmp_path / "busd.pid"
    out = tmp_path / "daemon.log"
    kept = tmp_path / "kept.txt"
    daemon_pid: int | None = None
    with subreaper():
        launcher = subprocess.Popen(
            [sys.executable, "-c", DAEMON, "daemon.log", str(pidfile), str(kept)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp_path,
            env=without_systemd_environment(),
        )
        try:
            # EOF once the daemon has pointed its stdout elsewhere.
            launched, _ = launcher.communicate(timeout=TIMEOUT)
            assert launcher.returncode == 0, launched
            assert "Bus STARTING" in launched
            assert "Bus STARTED" not in launched  # that happens in the daemon

            daemon_pid = wait_for(lambda: PIDFile(Bus(), pidfile).holder())
            assert daemon_pid != launcher.pid
            session = os.getsid(daemon_pid)
            # The first child called setsid() and left: it led the session.
            assert session not in (os.getsid(0), daemon_pid)
            assert reap(session) == 0
            daemon = psutil.Process(daemon_pid)
            assert daemon.ppid() == os.getpid()  # adopted: not the launcher's
            assert os.getpgid(daemon_pid) == session
            assert daemon.terminal() is None
            assert daemon.cwd() == "/"
            with open(f"/proc/{daemon_pid}/status") as status:
                assert "Umask:\t0027\n" in status.read()
            fds = {
                int(fd): os.readlink(f"/proc/{daemon_pid}/fd/{fd}")
                for fd in os.listdir(f"/proc/{daemon_pid}/fd")
            }
            assert fds[0] == os.devnull
            assert fds[1] == fds[2] == str(out)  # relative to the launcher's cwd
            # Held through the temporary name it was created under (so /proc
            # shows that name as deleted): compare inodes, not names.
            held = {
                (st.st_dev, st.st_ino)
                for st in (os.stat(f"/proc/{daemon_pid}/fd/{fd}") for fd in fds)
            }
            assert (pidfile.stat().st_dev, pidfile.stat().st_ino) in held
            assert str(kept) in fds.values()  # files_preserve
            assert not any(target.startswith("pipe:") for target in fds.values())

            wait_for(lambda: "Bus STARTED" in out.read_text())
            log = out.read_text()
            assert f"Daemonized: PID {daemon_pid}, session {session}." in log
            assert kept.read_text() == f"kept {daemon_pid}\n"

            os.kill(daemon_pid, signal.SIGTERM)
            assert reap(daemon_pid) == 0
            daemon_pid = None
            assert "Bus EXITED" in out.read_text()
            assert not pidfile.exists()
        finally:
            if launcher.poll() is None:
                os.kill(launcher.pid, signal.SIGKILL)
                launcher.wait(TIMEOUT)
            if daemon_pid is not None and psutil.pid_exists(daemon_pid):
                os.kill(daemon_pid, signal.SIGKILL)
                reap(daemon_pid)


@pytest.mark.parametrize("variable", SYSTEMD_VARIABLES)
def test_refuses_under_systemd(monkeypatch, variable: str) -> None:
    for name in SYSTEMD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "set-by-systemd")
    plugin = Daemonizer(Bus())
    with pytest.raises(RuntimeError) as caught:
        plugin.start()  # refuses before any fork: this is still pytest
    message = str(caught.value)
    assert f"under systemd ({variable} set)" in message
    assert "Type=notify" in message
    assert "`busd run` in the foreground" in message
    assert not plugin.finalized
    assert not plugin.daemonized


def test_a_refusal_under_systemd_ends_the_start_with_status_70(tmp_path) -> None:
    env = without_systemd_environment()
    env["INVOCATION_ID"] = "0123456789abcdef"
    done = subprocess.run(
        [sys.executable, "-c", DAEMON, "out.log", "busd.pid", "kept.txt"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 70, done.stdout + done.stderr
    assert "refusing to daemonize under systemd (INVOCATION_ID set)" in done.stdout
    assert not (tmp_path / "out.log").exists()  # never detached
    assert not (tmp_path / "busd.pid").exists()  # later start steps never ran


def test_refuses_once_the_bus_has_started(monkeypatch) -> None:
    for name in SYSTEMD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    bus = Bus()
    bus.start()
    try:
        assert bus.state is states.STARTED
        with pytest.raises(RuntimeError, match=r"already STARTED\. fork"):
            Daemonizer(bus).start()
    finally:
        bus.exit()


def test_priority_sits_before_the_pid_file() -> None:
    assert Daemonizer.start.priority == START_PRIORITY == 65
    assert PIDFile.start.priority > START_PRIORITY


def open_descriptors(pid: int) -> dict[int, str]:
    """What ``pid``'s descriptors point at, as /proc shows them now.

    A running daemon opens and closes descriptors of its own meanwhile
    (its threads): one gone between listing and reading is left out.
    """
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            found[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return found


@pytest.mark.parametrize(
    "options", [{}, BUSD_DAEMON_OPTIONS], ids=["cherrypy-defaults", "busd-daemon"]
)
def test_a_log_file_opened_before_daemonizing_keeps_its_own_file(
    tmp_path: Path, options: dict[str, object]
) -> None:
    """The log goes on to its file; the PID file holds the PID and nothing else.

    The old Daemonizer closed every descriptor: the FileHandler kept a dead
    number, the PID file's open got it, and log lines landed in the PID file.
    """
    log = tmp_path / "app.log"
    pidfile = tmp_path / "app.pid"
    inherited_path = tmp_path / "inherited.txt"
    daemon_pid: int | None = None
    with subreaper(), open(inherited_path, "w") as inherited:
        launcher = subprocess.Popen(
            [
                sys.executable,
                "-c",
                LOGGING_DAEMON,
                str(log),
                str(pidfile),
                json.dumps(options),
                str(inherited.fileno()),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=[inherited.fileno()],
            cwd=tmp_path,
            env=without_systemd_environment(),
        )
        try:
            assert launcher.wait(TIMEOUT) == 0
            daemon_pid = wait_for(lambda: PIDFile(Bus(), pidfile).holder())
            assert daemon_pid != launcher.pid
            reap(os.getsid(daemon_pid))  # the first child, session leader
            wait_for(lambda: f"after detaching: PID {daemon_pid}" in log.read_text())
            assert pidfile.read_text() == f"{daemon_pid}\n"
            text = log.read_text()
            assert f"Daemonized: PID {daemon_pid}" in text
            assert f"written to {pidfile}" in text

            fds = open_descriptors(daemon_pid)
            assert fds[0] == fds[1] == fds[2] == os.devnull
            assert str(log) in fds.values()  # the handler's own, never closed
            with open(f"/proc/{daemon_pid}/status") as status:
                umask = re.search(r"^Umask:\t(\d+)$", status.read(), re.M)
            assert umask is not None
            cwd = psutil.Process(daemon_pid).cwd()
            if options:
                assert (cwd, umask.group(1)) == ("/", "0022")
                # What the launcher passed down is closed: brokers never get it.
                assert str(inherited_path) not in fds.values()
            else:
                # CherryPy's Daemonizer: no chdir, umask 0, descriptors kept.
                assert (cwd, umask.group(1)) == (str(tmp_path), "0000")
                assert fds[inherited.fileno()] == str(inherited_path)

            os.kill(daemon_pid, signal.SIGTERM)
            assert reap(daemon_pid) == 0
            daemon_pid = None
            assert "Bus EXITED" in log.read_text()
            assert not pidfile.exists()
        finally:
            if launcher.poll() is None:
                os.kill(launcher.pid, signal.SIGKILL)
                launcher.wait(TIMEOUT)
            if daemon_pid is not None and psutil.pid_exists(daemon_pid):
                os.kill(daemon_pid, signal.SIGKILL)
                reap(daemon_pid)
            # A PID file that does not hold the PID (the bug this test is
            # about) gives no daemon_pid: end the daemon by its command line,
            # among the orphans this subreaper adopted.
            for child in psutil.Process().children():
                with contextlib.suppress(psutil.Error):
                    if str(pidfile) in child.cmdline():
                        child.kill()
                        reap(child.pid)


def test_the_static_daemonize_detaches_without_a_bus(tmp_path: Path) -> None:
    """CherryPy's ``Daemonizer.daemonize(stdin, stdout, stderr, logger)``."""
    script = r"""
import os, sys
from busd.plugins.daemonize import Daemonizer

Daemonizer.daemonize(stdout="out.log", stderr="out.log", logger=print)
print(f"daemon {os.getpid()} {os.getsid(0)} {os.getcwd()}", flush=True)
"""
    with subreaper():
        launcher = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            cwd=tmp_path,
            env=without_systemd_environment(),
        )
        assert launcher.returncode == 0, launcher.stderr
        assert launcher.stdout == ""  # the rest is the daemon's
        out = tmp_path / "out.log"
        wait_for(lambda: out.exists() and out.read_text().count("\n") == 2)
        logged, said = out.read_text().splitlines()
        _, pid, session, cwd = said.split()
        assert logged == f"Daemonized: PID {pid}, session {session}."
        assert cwd == str(tmp_path)
        assert reap(int(session)) == 0
        assert reap(int(pid)) == 0


def test_busd_the_daemon_asks_for_chdir_umask_and_no_inherited_descriptors(
    tmp_path: Path,
) -> None:
    """``busd run --daemonize`` (what ``busd start`` launches), configured
    explicitly: cwd /, umask 022, and nothing its launcher passed down."""
    config = tmp_path / "busd.toml"
    config.write_text("")
    pidfile, log = tmp_path / "busd.pid", tmp_path / "busd.log"
    command = [sys.executable, "-m", "busd", "run", "--daemonize"]
    command += ["--config", str(config), "--socket", str(tmp_path / "busd.sock")]
    command += ["--pidfile", str(pidfile), "--log-file", str(log)]
    env = {k: v for k, v in busctl_env().items() if k not in SYSTEMD_VARIABLES}
    daemon_pid: int | None = None
    with subreaper(), open(tmp_path / "inherited.txt", "w") as inherited:
        os.set_inheritable(inherited.fileno(), True)
        launcher = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=[inherited.fileno()],
            cwd=tmp_path,
            env=env,
        )
        try:
            assert launcher.wait(TIMEOUT) == 0
            daemon_pid = wait_for(lambda: PIDFile(Bus(), pidfile).holder(), TIMEOUT)
            reap(os.getsid(daemon_pid))
            wait_for(lambda: "Bus STARTED" in log.read_text(), TIMEOUT)
            fds = open_descriptors(daemon_pid)
            assert str(tmp_path / "inherited.txt") not in fds.values()
            assert fds[1] == fds[2] == str(log)
            assert psutil.Process(daemon_pid).cwd() == "/"
            with open(f"/proc/{daemon_pid}/status") as status:
                assert "Umask:\t0022\n" in status.read()
            os.kill(daemon_pid, signal.SIGTERM)
            assert reap(daemon_pid) == 0
            daemon_pid = None
            assert not pidfile.exists()
        finally:
            if launcher.poll() is None:
                os.kill(launcher.pid, signal.SIGKILL)
                launcher.wait(TIMEOUT)
            if daemon_pid is not None and psutil.pid_exists(daemon_pid):
                os.kill(daemon_pid, signal.SIGKILL)
                reap(daemon_pid)
