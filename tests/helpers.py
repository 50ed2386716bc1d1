"""Plain helpers shared by the tests: functions, classes and constants.

Test modules import these from here (``from helpers import ...``; pytest
puts tests/ on ``sys.path``). Fixtures live in conftest.py, which builds
them from these helpers. No test module imports from another test module.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from busctl.client import Client, ClientError, Timeout
from busd.protocol import FrameDecoder, encode_frame

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


# -- waiting, with a deadline ----------------------------------------------------------


def wait_for(
    condition: Callable[[], object], timeout: float = 10.0, what: str = ""
) -> object:
    """Poll ``condition`` until it returns a true value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what or condition}"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def pause(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until the kernel has really stopped it.

    kill() returns before the target stops; a test that relies on "busd
    does nothing now" must not race with its last instructions.
    """
    os.kill(pid, signal.SIGSTOP)
    wait_for(
        lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED,
        what=f"PID {pid} to stop",
    )


# -- a busd process --------------------------------------------------------------------

STARTUP_DEADLINE = 20.0


@dataclass
class RunningDaemon:
    """A busd process started by a test."""

    process: subprocess.Popen[bytes]
    directory: Path
    socket: str
    pidfile: str
    config: Path
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self, timeout: float = 10.0) -> Client:
        return Client(self.socket, timeout=timeout)

    def fork_server_pid(self) -> int:
        """The PID of busd's fork server: its child, which forks the workers."""
        with self.client() as client:
            pid = client.call("state")["fork_server"]
        assert psutil.Process(pid).ppid() == self.pid
        return pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the daemon by PID if it still runs, and reap it."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM the daemon by PID and return its exit status."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(5)
            raise


def answers(socket_path: str) -> bool:
    """Whether busd answers on ``socket_path`` and has finished starting."""
    try:
        with Client(socket_path, timeout=2) as client:
            return client.state()["state"] == "STARTED"
    except ClientError:
        return False


def busd_run(config: Path | str, socket_path: str, pidfile: str) -> list[str]:
    """The command line of ``busd run`` with this interpreter and these paths."""
    return [
        sys.executable,
        "-m",
        "busd",
        "run",
        "--config",
        str(config),
        "--socket",
        socket_path,
        "--pidfile",
        pidfile,
    ]


def start_daemon(
    directory: Path,
    config_text: str = "",
    wait: bool = True,
    env: dict[str, str] | None = None,
) -> RunningDaemon:
    """Start ``busd run`` with ``config_text`` in ``directory`` (made here).

    With ``wait``, return once it answers ``state`` with STARTED; the caller
    ends it by PID (``stop()`` or ``kill()``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "busd.toml"
    config.write_text(config_text)
    config.chmod(0o644)
    log = directory / "busd.log"
    socket_path = str(directory / "busd.sock")
    pidfile = str(directory / "busd.pid")
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            busd_run(config, socket_path, pidfile),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env={**os.environ, **(env or {})},
        )
    daemon = RunningDaemon(process, directory, socket_path, pidfile, config, log)
    if wait:
        deadline = time.monotonic() + STARTUP_DEADLINE
        while not answers(socket_path):
            if process.poll() is not None:
                raise AssertionError(
                    f"busd exited with {process.returncode}:\n{daemon.log_text()}"
                )
            if time.monotonic() > deadline:
                daemon.kill()
                raise AssertionError(f"busd did not answer:\n{daemon.log_text()}")
            time.sleep(0.02)
    return daemon


# -- raw frames on the control socket --------------------------------------------------


class RawConnection:
    """Frames (or any bytes) on a bare socket, to see exactly what busd sends.

    Every read blocks at most ``timeout`` seconds, so a test that waits for
    an answer that never comes fails instead of hanging.
    """

    def __init__(self, path: str, timeout: float = 10.0, max_frame: int = 1 << 20):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.decoder = FrameDecoder(max_frame)
        self.pending: list[object] = []

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(self, message: object) -> None:
        self.sock.sendall(encode_frame(message))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self) -> dict:
        while not self.pending:
            data = self.sock.recv(65536)
            assert data, "busd closed the connection"
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    def request(self, message: object) -> dict:
        self.send(message)
        return self.receive()

    def wait_closed(self) -> list[object]:
        """Read until busd closes the connection; return the frames read."""
        frames, self.pending = self.pending, []
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                # busd closed with bytes of ours unread: the kernel says "reset"
                # once the frames it had sent are read.
                return frames
            if not data:
                return frames
            frames += self.decoder.feed(data)

    def close(self) -> None:
        self.sock.close()


# -- brokers: their config, what they recorded, their state ----------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def broker(
    name: str,
    handler: str,
    record: Path | None = None,
    env: dict[str, str] | None = None,
    channels: tuple[str, ...] = ("main",),
    **settings: Any,
) -> str:
    """A ``[brokers.NAME]`` table; test brokers hear ``channels`` too."""
    cwd = ROOT if handler.startswith("examples.") else TESTS
    environment = {"CHANNELS": ",".join(channels), **(env or {})}
    if record is not None:
        environment["RECORD"] = str(record)
    lines = [
        f"[brokers.{name}]",
        f"handler = {toml_value(handler)}",
        f"cwd = {toml_value(cwd)}",
        f"channels = {toml_value(channels)}",
        *(f"{key} = {toml_value(value)}" for key, value in settings.items()),
        "env = { "
        + ", ".join(f"{k} = {toml_value(v)}" for k, v in environment.items())
        + " }",
    ]
    return "\n".join(lines) + "\n\n"


def records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines a test broker appended to ``path`` so far."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [
        json.loads(line) for line in text.splitlines(keepends=True) if line[-1:] == "\n"
    ]


def wait_records(
    path: Path, condition: Any, timeout: float = 20.0, what: str = ""
) -> list[dict[str, Any]]:
    """Wait until ``condition(records)`` holds; return those records."""
    found: list[list[dict[str, Any]]] = []

    def check() -> bool:
        found[:] = [records(path)]
        return bool(condition(found[0]))

    try:
        wait_for(check, timeout, what or f"records in {path.name}")
    except AssertionError as error:
        raise AssertionError(
            f"{error}; last {found[0][-5:] if found else []}"
        ) from None
    return found[0]


def messages_of(found: list[dict[str, Any]]) -> list[Any]:
    return [r["message"] for r in found if "message" in r]


def rows(client: Client, name: str) -> list[dict[str, Any]]:
    """The ``state`` rows of broker ``name``'s instances."""
    return client.state()["brokers"][name]["instances"]


def wait_states(
    client: Client, name: str, expected: list[str], timeout: float = 20.0
) -> list[dict[str, Any]]:
    """Wait until broker ``name``'s instances are in ``expected`` states."""
    found: list[list[dict[str, Any]]] = [[]]

    def check() -> bool:
        found[0] = rows(client, name)
        return [r["state"] for r in found[0]] == expected

    wait_for(check, timeout, f"{name} instances {expected}")
    return found[0]


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie waiting for init counts)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def collect(
    stream: Any, events: list[dict[str, Any]], condition: Any, timeout: float = 20.0
) -> list[dict[str, Any]]:
    """Read ``stream`` into ``events`` until ``condition(events)``."""
    deadline = time.monotonic() + timeout
    while not condition(events):
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise Timeout("deadline")
            events.append(stream.next_event(left))
        except Timeout:
            raise AssertionError(
                f"no matching events within {timeout} s: {events}"
            ) from None
    return events


def broker_events(events: list[dict[str, Any]], name: str) -> list[str]:
    return [e["state"] for e in events if e.get("broker") == name]


def log_lines(client: Client, source: str) -> list[dict[str, Any]]:
    return client.logs(lines=1000, source=source)["lines"]


# -- the busctl command ----------------------------------------------------------------


def busctl_env() -> dict[str, str]:
    # The working tree's busctl, whatever is installed, and no $BUSD_SOCKET
    # from the caller: every test names its socket.
    env = {k: v for k, v in os.environ.items() if k != "BUSD_SOCKET"}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )
    return env


def busctl(
    *args: str, input: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run busctl to completion (``run`` kills it by PID on timeout)."""
    return subprocess.run(
        [sys.executable, "-m", "busctl", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=busctl_env(),
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The error contract: one line on stderr, starting "busctl", no traceback."""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("busctl"), result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr.rstrip("\n")


# -- the orders broker (examples.stock:OrderBroker), seen through busctl ---------------

ORDERS = f"""
[brokers.orders]
handler = "examples.stock:OrderBroker"
cwd = {json.dumps(str(ROOT))}
channels = ["main"]
instances = 2
max_retries = 0
"""


RUNNING_ROW = re.compile(
    r"^  orders:(?P<index>\d+)  RUNNING   pid (?P<pid>\d+)  up \d+\w+(?: \d+\w+)?  "
    r"restarts \d+  cpu \d+\.\d%  rss [\d.]+[KMG]?i?B  fds \d+  "
    r"inflight \d+  acked \d+(?:  nacked \d+)?$",
    re.MULTILINE,
)


def run(daemon: RunningDaemon, *args: str, **kwargs: Any):
    """Run busctl ``args`` against ``daemon``'s socket."""
    return busctl("--socket", daemon.socket, *args, **kwargs)


def broker_state(daemon: RunningDaemon, name: str = "orders") -> dict[str, Any]:
    with daemon.client() as client:
        return client.state()["brokers"][name]


def instance_pids(daemon: RunningDaemon) -> dict[int, int]:
    """index -> PID of each orders instance that has a process."""
    return {
        row["index"]: row["pid"]
        for row in broker_state(daemon)["instances"]
        if row["pid"]
    }


def assert_worker_of(daemon: RunningDaemon, pid: int) -> None:
    """``pid`` is a running worker: forked by the fork server, busd's child."""
    process = psutil.Process(pid)
    assert process.is_running() and process.ppid() == daemon.pid
    assert daemon.fork_server_pid() != pid


def running_rows(table: str) -> dict[int, int]:
    """index -> PID of each RUNNING orders row of ``busctl state``."""
    return {int(m["index"]): int(m["pid"]) for m in RUNNING_ROW.finditer(table)}


def state_table(daemon: RunningDaemon) -> str:
    result = run(daemon, "state")
    assert (result.returncode, result.stderr) == (0, "")
    return result.stdout


# -- a Bus's log channel ---------------------------------------------------------------


def record_log(bus: Any) -> list[tuple[str, int]]:
    """The (message, level) pairs ``bus`` logs from now on, as they come."""
    lines: list[tuple[str, int]] = []
    bus.subscribe("log", lambda msg, level: lines.append((msg, level)))
    return lines


def default_sigint() -> None:
    """Give a child SIGINT at its default, as a terminal does (a preexec_fn).

    A test run started in the background inherits SIGINT *ignored*, and a
    Python started so keeps ignoring it: a Ctrl-C test would then wait for
    an interrupt its program never sees.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


#: What systemd puts in its services' environment (the Daemonizer refuses it).
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "INVOCATION_ID")
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def without_systemd_environment() -> dict[str, str]:
    """This environment without systemd's variables (busd refuses them)."""
    return {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}


def reap(pid: int, timeout: float = 15.0) -> int:
    """Wait for our child ``pid`` to end, with a deadline; its exit code."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            raise AssertionError(f"PID {pid} did not end within {timeout} s")
        time.sleep(0.005)


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """Adopt orphaned descendants, so the test can reap a daemon itself.

    Without it a daemon's parent would be PID 1 of the container, which
    may never collect its exit status.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, (
        f"prctl(PR_SET_CHILD_SUBREAPER): errno {ctypes.get_errno()}"
    )
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
