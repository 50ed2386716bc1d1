"""Start and stop that compose: ``busctl shutdown --wait``, ``busd stop`` and
``restart``, ``busd start`` after a shutdown, and no publish accepted once
busd is stopping.

Real daemons (``busd run`` from the fixtures, or detached by ``busd
start``), real signals. A daemon that takes a while to stop has a
``Stubborn`` broker (tests/brokers_for_tests.py): it ignores SIGTERM and
hangs in its stop listener, so busd's stop lasts the broker's
``stop_timeout`` (SIGKILL at its end): a window that is there for sure.
Each test ends the daemons it started, by PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import (
    assert_one_line_error,
    broker,
    busctl,
    busctl_env,
    gone,
    records,
    wait_for,
    wait_records,
)

from busctl.client import BusError, Client

DEADLINE = 30.0


def stubborn(record: Path, stop_timeout: float = 2) -> str:
    """A broker that makes busd's stop last ``stop_timeout`` seconds."""
    return broker(
        "stub", "brokers_for_tests:Stubborn", record=record, stop_timeout=stop_timeout
    )


def busd(*args: str, timeout: float = DEADLINE) -> subprocess.CompletedProcess[str]:
    """Run ``python -m busd ARGS`` (this working tree) to completion."""
    return subprocess.run(
        [sys.executable, "-m", "busd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=busctl_env(),
        check=False,
    )


class Detached:
    """Paths for a daemon started by ``busd start``, and its end by PID."""

    def __init__(self, directory: Path, config_text: str = "") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / "busd.toml"
        self.config.write_text(config_text)
        self.config.chmod(0o644)
        self.socket = str(directory / "busd.sock")
        self.pidfile = str(directory / "busd.pid")
        self.log = directory / "busd.log"
        self.pids: list[int] = []  # every daemon seen, ended at teardown

    @property
    def options(self) -> list[str]:
        return ["--config", str(self.config), "--socket", self.socket]

    def paths(self) -> list[str]:
        return [*self.options, "--pidfile", self.pidfile]

    def start(self) -> int:
        """``busd start``; the daemon's PID, checked to be STARTED."""
        result = busd("start", *self.paths(), "--log-file", str(self.log))
        assert result.returncode == 0, result.stderr
        pid = self.pid_in_file()
        assert result.stdout == (
            f"busd started: PID {pid}, socket {self.socket}, log {self.log}\n"
        )
        return pid

    def pid_in_file(self) -> int:
        pid = int(Path(self.pidfile).read_text())
        self.pids.append(pid)
        return pid

    def state(self) -> dict:
        with Client(self.socket, timeout=10) as client:
            return client.state()

    def end(self) -> None:
        for pid in self.pids:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
                wait_for(lambda p=pid: gone(p), DEADLINE, f"PID {pid} to end")


@pytest.fixture
def detached(tmp_path: Path) -> Iterator[Detached]:
    daemon = Detached(tmp_path / "detached")
    yield daemon
    daemon.end()


# -- busctl shutdown --wait ---------------------------------------------------------


def test_shutdown_wait_returns_once_busd_is_gone(start_busd, tmp_path):
    # Before: "--wait" was an unknown argument (exit 64).
    daemon = start_busd(config_text=stubborn(tmp_path / "stub.jsonl"))
    result = busctl("--socket", daemon.socket, "shutdown", "--wait")
    # At that moment, not later: the process had ended when busctl returned.
    assert gone(daemon.pid)
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"busd (PID {daemon.pid}) has exited\n",
        "",
    )
    assert daemon.process.wait(DEADLINE) == 0
    # The stubborn worker made the stop last its stop_timeout: busctl waited.
    assert any(r.get("event") == "stop" for r in records(tmp_path / "stub.jsonl"))


def test_shutdown_wait_says_when_busd_outlives_the_timeout(start_busd, tmp_path):
    daemon = start_busd(config_text=stubborn(tmp_path / "stub.jsonl", stop_timeout=6))
    result = busctl("--socket", daemon.socket, "--timeout", "1", "shutdown", "--wait")
    assert not gone(daemon.pid)
    assert result.returncode == 75
    assert assert_one_line_error(result) == (
        f"busctl: busd (PID {daemon.pid}) still runs 1 s after the shutdown "
        "request; it is still stopping: wait longer (busctl --timeout 60 shutdown "
        "--wait) or end it with kill -9"
    )
    assert daemon.process.wait(DEADLINE) == 0  # it does end, later


def test_client_shutdown_wait(busd_daemon):
    with busd_daemon.client() as client:
        result = client.shutdown(wait=True)
        assert gone(busd_daemon.pid)
    assert (result["pid"], result["stopping"], result["exited"]) == (
        busd_daemon.pid,
        True,
        True,
    )
    assert busd_daemon.process.wait(DEADLINE) == 0


def test_shutdown_without_wait_still_answers_at_once(start_busd, tmp_path):
    daemon = start_busd(config_text=stubborn(tmp_path / "stub.jsonl", stop_timeout=4))
    result = busctl("--socket", daemon.socket, "--json", "shutdown")
    assert result.returncode == 0, result.stderr
    assert not gone(daemon.pid)  # still stopping its stubborn broker
    assert daemon.process.wait(DEADLINE) == 0


# -- busd stop, busd restart ------------------------------------------------------


def test_busd_stop_ends_a_daemon_busd_start_started(detached):
    # Before: there was no `busd stop`.
    pid = detached.start()
    assert detached.state()["state"] == "STARTED"  # start waited for that
    result = busd("stop", *detached.paths())
    assert gone(pid)
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"busd stopped: PID {pid} on {detached.socket} (PID file {detached.pidfile})\n",
        "",
    )
    assert not os.path.exists(detached.socket)
    assert not os.path.exists(detached.pidfile)


def test_busd_stop_when_nothing_runs_says_so_and_succeeds(detached):
    result = busd("stop", *detached.paths())
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        f"busd is not running: nothing answers on {detached.socket} and no "
        f"process holds {detached.pidfile}\n"
    )


def test_busd_stop_signals_a_daemon_whose_socket_does_not_answer(detached, tmp_path):
    # Found by its PID file alone (stop was given another socket): SIGTERM.
    pid = detached.start()
    other = str(tmp_path / "other.sock")
    result = busd(
        "stop", "--config", str(detached.config), "--socket", other,
        "--pidfile", detached.pidfile,
    )  # fmt: skip
    assert gone(pid)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        f"busd stopped: PID {pid} (it holds the PID file {detached.pidfile})\n"
    )


def test_busd_stop_says_when_busd_outlives_the_wait(tmp_path):
    daemon = Detached(tmp_path / "slow", stubborn(tmp_path / "stub.jsonl", 6))
    try:
        pid = daemon.start()
        result = busd("stop", *daemon.paths(), "--wait", "1")
        assert not gone(pid)
        assert (result.returncode, result.stdout) == (75, "")
        assert result.stderr == (
            f"busd: PID {pid} still runs 1 s after it was asked to stop (--wait); "
            f"busctl state shows what it waits for, kill -9 {pid} ends it\n"
        )
        # It does end: a second stop waits for it without asking again.
        again = busd("stop", *daemon.paths())
        assert again.returncode == 0, again.stderr
        assert gone(pid)
    finally:
        daemon.end()


def test_busd_restart_replaces_the_daemon(detached):
    old = detached.start()
    result = busd("restart", *detached.paths(), "--log-file", str(detached.log))
    assert result.returncode == 0, result.stderr
    new = detached.pid_in_file()
    assert new != old and gone(old)
    assert result.stdout == (
        f"busd stopped: PID {old} on {detached.socket} (PID file "
        f"{detached.pidfile})\n"
        f"busd started: PID {new}, socket {detached.socket}, log {detached.log}\n"
    )
    assert detached.state()["pid"] == new


def test_busd_restart_starts_a_daemon_when_none_runs(detached):
    result = busd("restart", *detached.paths(), "--log-file", str(detached.log))
    assert result.returncode == 0, result.stderr
    pid = detached.pid_in_file()
    assert detached.state()["pid"] == pid


def test_busd_restart_with_a_broken_config_stops_nothing(detached):
    pid = detached.start()
    detached.config.write_text("[busd]\nlog_level = 5\n")
    result = busd("restart", *detached.paths())
    assert result.returncode == 78
    assert "[busd] log_level: expected one of" in result.stderr
    assert detached.state()["pid"] == pid


# -- busd start after a shutdown ----------------------------------------------------


def test_shutdown_then_start_leaves_a_daemon_running(tmp_path):
    # Before: start saw the stopping busd answer, printed "busd is already
    # running: PID N" and exited 0; a moment later nothing ran.
    # 5 s of stop: busd start surely probes while the old busd still answers.
    daemon = Detached(tmp_path / "d", stubborn(tmp_path / "stub.jsonl", 5))
    try:
        old = daemon.start()
        wait_records(tmp_path / "stub.jsonl", lambda r: r, what="the broker")
        busctl_command = [sys.executable, "-m", "busctl", "--socket", daemon.socket]
        busd_command = [sys.executable, "-m", "busd", "start", *daemon.paths()]
        shell = subprocess.run(
            [
                "sh",
                "-c",
                f"{' '.join(busctl_command)} shutdown && {' '.join(busd_command)}",
            ],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            env=busctl_env(),
            check=False,
        )
        assert shell.returncode == 0, shell.stderr
        assert gone(old)
        new = daemon.pid_in_file()
        assert new != old
        assert shell.stdout == (
            "shutdown requested\n"
            f"busd started: PID {new}, socket {daemon.socket}, log "
            f"{Path(daemon.pidfile).parent / 'busd.log'}\n"
        )
        assert shell.stderr == f"busd: waiting for PID {old} to exit (it is stopping)\n"
        state = daemon.state()
        assert (state["pid"], state["state"]) == (new, "STARTED")
    finally:
        daemon.end()


def test_busd_run_beside_a_stopping_busd_says_so(start_busd, tmp_path):
    daemon = start_busd(config_text=stubborn(tmp_path / "stub.jsonl", stop_timeout=6))
    with daemon.client() as client:
        client.shutdown()
    other = busd(
        "run", "--config", str(daemon.config), "--socket", daemon.socket,
        "--pidfile", daemon.pidfile,
    )  # fmt: skip
    assert other.returncode == 75
    assert other.stderr == (
        f"busd: busd is still stopping there: PID {daemon.pid} on {daemon.socket} "
        f"(PID file {daemon.pidfile}); try again once it has exited (busd start "
        "waits for that)\n"
    )
    assert daemon.process.wait(DEADLINE) == 0


def test_hello_says_whether_busd_is_stopping(start_busd, tmp_path):
    daemon = start_busd(config_text=stubborn(tmp_path / "stub.jsonl", stop_timeout=4))
    with daemon.client() as watcher:
        hello = watcher.hello()
        assert (hello["state"], hello["stopping"]) == ("STARTED", False)
        with daemon.client() as client:
            client.shutdown()
        # At once, before the main thread has even begun to stop.
        assert watcher.hello()["stopping"] is True
        wait_for(lambda: watcher.hello()["state"] == "STOPPING", what="STOPPING")
    assert daemon.process.wait(DEADLINE) == 0


# -- no publish accepted once busd is stopping --------------------------------------


def test_a_publish_while_busd_stops_is_refused(start_busd, tmp_path):
    # Before: accepted while the brokers stopped; one that came after the
    # spool closed (stop step 61) and before the socket did (90) was lost.
    record = tmp_path / "stub.jsonl"
    daemon = start_busd(
        config_text=f'[busd]\nspool = "{tmp_path / "spool"}"\n\n'
        + stubborn(record, stop_timeout=4)
    )
    with daemon.client() as client:
        accepted = client.publish("main", "before")
        wait_records(record, lambda r: "before" in [x.get("message") for x in r])
        client.call("shutdown")
        wait_records(record, lambda r: any(x.get("event") == "stop" for x in r))
        assert client.state()["state"] == "STOPPING"
        with pytest.raises(BusError) as refused:
            client.publish("main", "during the stop")
        published = client.state()["published"]
    assert refused.value.code == "busy"
    assert refused.value.message == (
        "busd is stopping: the message was not accepted; try again once busd runs again"
    )
    assert accepted["brokers"] == 1 and published == 1
    assert daemon.process.wait(DEADLINE) == 0


def test_busctl_publish_while_busd_stops_exits_75(start_busd, tmp_path):
    record = tmp_path / "stub.jsonl"
    daemon = start_busd(config_text=stubborn(record, stop_timeout=4))
    wait_records(record, lambda r: r, what="the broker")
    with daemon.client() as client:
        client.call("shutdown")
    wait_records(record, lambda r: any(x.get("event") == "stop" for x in r))
    result = busctl("--socket", daemon.socket, "publish", "main", "late")
    assert result.returncode == 75
    assert assert_one_line_error(result) == (
        "busctl: busd is stopping: the message was not accepted; try again once "
        "busd runs again"
    )
    assert daemon.process.wait(DEADLINE) == 0


def test_shutdown_wait_returns_after_the_workers_are_gone_too(start_busd, tmp_path):
    record = tmp_path / "stub.jsonl"
    daemon = start_busd(config_text=stubborn(record))
    worker = wait_records(record, lambda r: r, what="the broker")[0]["pid"]
    assert psutil.Process(worker).is_running()
    result = busctl("--socket", daemon.socket, "shutdown", "--wait")
    assert result.returncode == 0, result.stderr
    assert gone(worker)
    assert daemon.process.wait(DEADLINE) == 0


def test_busd_start_warns_on_the_terminal_about_a_missing_program(tmp_path):
    # The daemon's own warning goes to its log file; start shows it here too.
    daemon = Detached(
        tmp_path / "d", '[brokers.gone]\ncommand = ["no-such-program-for-busd"]\n'
    )
    try:
        result = busd("start", *daemon.paths(), "--log-file", str(daemon.log))
        assert result.returncode == 0, result.stderr
        daemon.pid_in_file()
        assert result.stderr == (
            f"busd: warning: {daemon.config}: [brokers.gone] command[0]: "
            '"no-such-program-for-busd" is not on the worker\'s PATH '
            f"({os.environ['PATH']}); its instances cannot start\n"
        )
        assert "its instances cannot start" in daemon.log.read_text()
    finally:
        daemon.end()
