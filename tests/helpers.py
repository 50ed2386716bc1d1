"""Plain helpers shared by the tests: functions, classes and constants.

Test modules import these from here (``from helpers import ...``; pytest
puts tests/ on ``sys.path``). Fixtures live in conftest.py, which builds
them from these helpers. No test module imports from another test module.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from busctl.client import Client, ClientError
from busd.protocol import FrameDecoder, encode_frame

STARTUP_DEADLINE = 20.0


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
        """The PID of busd's fork server: its child, the workers' parent."""
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
