"""busctl as a user meets it: the real command, a real busd, real exit codes.

Every test runs ``python -m busctl`` as a subprocess and looks at what a
user or a script sees: standard output, standard error and the exit status
(sysexits: 64 usage, 69 busd not running, 75 timed out, 77 permission
denied; the 77 cases need another uid and live in test_access.py). Commands
that run until interrupted (``subscribe``, ``logs -f``) are read line by
line with a deadline and ended by PID with SIGINT, as Ctrl-C would.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from helpers import (
    assert_one_line_error,
    busctl,
    busctl_env,
    default_sigint,
    wait_for,
)

from busctl.client import Client
from busd import __version__

COMMANDS = [
    "ping",
    "state",
    "publish",
    "subscribe",
    "events",
    "logs",
    "reload",
    "shutdown",
]


class LongRunning:
    """A busctl that runs until interrupted: read its lines, then SIGINT it."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "busctl", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=busctl_env(),
            # Ctrl-C in a terminal: SIGINT at its default. A test run started
            # in the background inherits SIGINT ignored, and Python keeps an
            # ignored SIGINT ignored: busctl would never see the interrupt.
            preexec_fn=default_sigint,
        )
        self._pending = b""

    def readline(self, timeout: float = 10.0) -> str:
        """The next line of its output; fail if none comes within ``timeout``."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line from busctl within {timeout} s")
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(
                        f"busctl ended ({self.process.wait(5)}) without a line: "
                        f"{self.process.stderr.read()!r}"
                    )
                self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return line.decode()

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C by PID; its exit status and standard error."""
        os.kill(self.process.pid, signal.SIGINT)
        _, err = self.process.communicate(timeout=10)
        return self.process.returncode, err.decode()


@pytest.fixture
def long_running() -> Iterator[Callable[..., LongRunning]]:
    started: list[LongRunning] = []

    def start(*args: str) -> LongRunning:
        started.append(LongRunning(*args))
        return started[-1]

    yield start
    for running in started:
        if running.process.poll() is None:
            os.kill(running.process.pid, signal.SIGKILL)
        running.process.communicate(timeout=10)


def subscribed(client: Client, channel: str, message: str) -> Callable[[], bool]:
    """A condition: publishing ``message`` reached a subscriber.

    Messages published before the subscriber is in place reach nobody, so
    the first one that counts a subscriber is the first it prints.
    """
    return lambda: client.publish(channel, message)["subscribers"] >= 1


# -- commands ------------------------------------------------------------------


def test_ping_says_pong(busd_daemon):
    result = busctl("--socket", busd_daemon.socket, "ping")
    assert (result.returncode, result.stdout, result.stderr) == (0, "pong\n", "")


def test_state_as_a_table_and_as_json(busd_daemon):
    table = busctl("--socket", busd_daemon.socket, "state")
    assert table.returncode == 0, table.stderr
    assert "STARTED" in table.stdout
    assert re.search(rf"Main PID: {busd_daemon.pid}\b", table.stdout)
    assert busd_daemon.socket in table.stdout

    as_json = busctl("--socket", busd_daemon.socket, "--json", "state")
    assert as_json.returncode == 0, as_json.stderr
    state = json.loads(as_json.stdout)
    assert state["state"] == "STARTED"
    assert state["pid"] == busd_daemon.pid


def test_publish_names_the_message_id(busd_daemon):
    result = busctl("--socket", busd_daemon.socket, "publish", "main", "BUY ABCD 10")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        r"published message \d+ on main \(0 brokers, 0 subscribers\)\n", result.stdout
    )
    with busd_daemon.client() as client:
        assert client.state()["published"] == 1


def test_json_message_arrives_as_a_map(busd_daemon):
    with busd_daemon.client() as listener:
        stream = listener.subscribe("audit")
        result = busctl(
            "--socket", busd_daemon.socket, "publish", "--json-message", "audit",
            '{"a": 1}',
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert stream.next_event(10) == {"channel": "audit", "message": {"a": 1}}


@pytest.mark.parametrize("running", [True, False], ids=["busd-up", "busd-down"])
def test_bad_json_message_is_a_usage_error(start_busd, tmp_path, running):
    # Bad input is the caller's to fix, whether or not busd runs: it is
    # checked before connecting.
    path = start_busd().socket if running else str(tmp_path / "absent.sock")
    result = busctl("--socket", path, "publish", "--json-message", "audit", '{"a":')
    assert result.returncode == 64
    assert assert_one_line_error(result).startswith("busctl: --json-message: not JSON")
    assert result.stdout == ""


def test_publish_from_stdin_keeps_the_order(busd_daemon):
    lines = [f"order {i:03d}" for i in range(200)]
    with busd_daemon.client() as listener:
        stream = listener.subscribe("main")
        result = busctl(
            "--socket", busd_daemon.socket, "publish", "main", "-",
            input="\n".join(lines) + "\n",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout == "published 200 messages on main\n"
        received = [stream.next_event(10)["message"] for _ in lines]
    assert received == lines


def test_subscribe_prints_until_interrupted(busd_daemon, long_running):
    subscriber = long_running("--socket", busd_daemon.socket, "subscribe", "main")
    with busd_daemon.client() as client:
        wait_for(subscribed(client, "main", "hello"), what="busctl subscribed")
        client.publish("main", "BUY ABCD 10")
        client.publish("other", "not for this subscriber")
        client.publish("main", {"structured": [1, 2]})
    assert subscriber.readline() == "main: hello"
    assert subscriber.readline() == "main: BUY ABCD 10"
    assert subscriber.readline() == "main: {'structured': [1, 2]}"
    assert subscriber.interrupt() == (0, "")


def test_subscriber_whose_reader_left_exits_quietly(busd_daemon, long_running):
    # `busctl subscribe main | head -1`: the pipe closes under busctl.
    subscriber = long_running("--socket", busd_daemon.socket, "subscribe", "main")
    with busd_daemon.client() as client:
        wait_for(subscribed(client, "main", "hello"), what="busctl subscribed")
        assert subscriber.readline() == "main: hello"
        subscriber.process.stdout.close()
        client.publish("main", "nobody reads this")
        assert subscriber.process.wait(10) == 0
    assert subscriber.process.stderr.read() == b""


def test_logs_prints_the_last_lines(busd_daemon):
    result = busctl("--socket", busd_daemon.socket, "logs", "-n", "5")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 5
    for line in lines:
        assert re.fullmatch(r"\d\d:\d\d:\d\d \w+ +[\w.]+: .+", line), line
    assert lines[-1].endswith("busd: Bus STARTED")


def test_logs_follow_prints_new_lines(busd_daemon, long_running):
    follower = long_running("--socket", busd_daemon.socket, "logs", "-f", "-n", "1")
    # The recent line comes after busd has started following for us.
    assert follower.readline().endswith("Bus STARTED")
    os.kill(busd_daemon.pid, signal.SIGUSR1)  # a graceful restart logs lines
    deadline = time.monotonic() + 10
    while not follower.readline(deadline - time.monotonic()).endswith("Bus graceful"):
        pass
    assert follower.interrupt() == (0, "")


def test_reload(busd_daemon):
    result = busctl("--socket", busd_daemon.socket, "reload")
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        "reload requested\n",
        "",
    )
    wait_for(lambda: "Reloaded configuration" in busd_daemon.log_text())


def test_shutdown_stops_busd(busd_daemon):
    result = busctl("--socket", busd_daemon.socket, "shutdown")
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        "shutdown requested\n",
        "",
    )
    assert busd_daemon.process.wait(15) == 0


# -- exit statuses -------------------------------------------------------------


def test_no_socket_means_busd_is_not_running(tmp_path):
    path = str(tmp_path / "absent.sock")
    result = busctl("--socket", path, "ping")
    assert result.returncode == 69
    assert assert_one_line_error(result).startswith(
        f"busctl: busd is not running: no socket at {path}"
    )


def test_a_socket_nobody_listens_on_refuses_connections(tmp_path):
    path = str(tmp_path / "dead.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(path)  # the file stays when the socket closes, as after a crash
    result = busctl("--socket", path, "ping")
    assert result.returncode == 69
    assert f"{path} refuses connections" in assert_one_line_error(result)


def test_a_server_that_never_answers_times_out(tmp_path):
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(path)
        # The kernel completes connections into the backlog: busctl gets
        # connected, sends its request, and no answer ever comes.
        silent.listen(1)
        result = busctl("--socket", path, "--timeout", "0.3", "ping")
    assert result.returncode == 75
    assert "did not answer within 0.3 s" in assert_one_line_error(result)


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["publish", "main"],
        ["subscribe"],
        ["--timeout", "0", "ping"],
        ["--timeout", "nan", "ping"],
        ["--timeout", "soon", "ping"],
        ["logs", "-n", "-1"],
        ["--no-such-option", "ping"],
    ],
    ids=lambda args: " ".join(args) or "no-command",
)
def test_usage_errors_exit_64(tmp_path, args):
    # A socket that isn't there: a usage error must win over "not running".
    result = busctl("--socket", str(tmp_path / "absent.sock"), *args)
    assert result.returncode == 64
    assert "--help" in assert_one_line_error(result)
    assert result.stdout == ""


# -- help, version, start-up ---------------------------------------------------


def test_help_shows_examples_and_exit_statuses():
    result = busctl("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout
    assert "examples:" in result.stdout
    assert "exit status:" in result.stdout and "77 permission denied" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_help_shows_examples(command):
    result = busctl(command, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: busctl {command}")
    assert "examples:\n  busctl" in result.stdout
    assert "exit status:" in result.stdout


def test_version():
    result = busctl("--version")
    assert (result.returncode, result.stdout) == (0, f"busctl {__version__}\n")


def test_ping_loads_neither_asyncio_nor_the_daemon(busd_daemon):
    ping = ["--socket", busd_daemon.socket, "ping"]
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "busctl", *ping],
        capture_output=True,
        text=True,
        timeout=30,
        env=busctl_env(),
    )
    assert (result.returncode, result.stdout) == (0, "pong\n")
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "busctl.client" in imported  # the log is the one we think it is
    heavy = {"asyncio", "busd.daemon", "busd.control", "busd.bus", "psutil"}
    assert not heavy & imported
    assert not [name for name in imported if name.startswith("asyncio.")]
