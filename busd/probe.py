"""Which busd runs on a socket and PID file, and waiting for a process to end.

``busd start``, ``stop`` and ``restart`` (busd/launcher.py) and ``busd
run`` before it starts (busd/cli.py) look at a daemon from the outside.
Two things say that one runs: its control socket answers ``hello``, and
its PID file is locked (busd/plugins/pidfile.py). Neither alone is enough:
a stopping busd closes its socket (stop step 90) before it lets go of its
PID file (exit step 90), and a starting one takes the PID file (70) before
it binds the socket (75).

A busd that answers may already be on its way out: ``hello`` says so
(``stopping``: an exit was requested or has begun). A caller that would
take its place waits for its PID to be gone (:func:`wait_gone`, on a pidfd:
no polling, and a zombie counts as gone).

This speaks the wire protocol itself (busd/protocol.py): busd imports
nothing from busctl.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

from busd.plugins.pidfile import holder_of
from busd.protocol import FrameDecoder, ProtocolError, encode_frame

__all__ = ["Answer", "Refused", "Running", "call", "find", "hello", "wait_gone"]


class Refused(Exception):
    """busd answered a request with an error (``code``: docs/protocol.md)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Answer:
    """What a busd said to ``hello``."""

    pid: int
    #: The bus state ("STARTING", "STARTED", ...); "" if it did not say.
    state: str
    #: An exit was requested or has begun: it will be gone soon.
    stopping: bool


@dataclass(frozen=True)
class Running:
    """What runs on a socket and PID file (:func:`find`)."""

    socket_path: str
    pidfile: str
    #: The answer on the socket, None when nothing answers there.
    answer: Answer | None
    #: The PID holding the PID file's lock, None when nobody holds it.
    holder: int | None

    @property
    def pids(self) -> list[int]:
        """Every process found: the one answering first, then the holder."""
        found = [self.answer.pid] if self.answer is not None else []
        if self.holder is not None and self.holder not in found:
            found.append(self.holder)
        return found

    def describe(self) -> str:
        """What runs, in words: "PID N on SOCKET (PID file PATH)" and the like."""
        answer, holder = self.answer, self.holder
        if answer is None:
            return f"PID {holder} (it holds the PID file {self.pidfile})"
        on_socket = f"PID {answer.pid} on {self.socket_path}"
        if holder is None:
            return on_socket
        if holder == answer.pid:
            return f"{on_socket} (PID file {self.pidfile})"
        return f"{on_socket}, and PID {holder} holds the PID file {self.pidfile}"


def find(
    socket_path: str, pidfile: str, timeout: float = 2.0, ask_socket: bool = True
) -> Running | None:
    """What runs on ``socket_path`` and ``pidfile``; None when nothing does.

    ``ask_socket`` False: the PID file only (a socket systemd holds for a
    busd not serving it yet would keep a ``hello`` waiting ``timeout``).
    """
    answer = hello(socket_path, timeout) if ask_socket else None
    holder = holder_of(pidfile)
    if answer is None and holder is None:
        return None
    return Running(socket_path, pidfile, answer, holder)


def hello(socket_path: str, timeout: float) -> Answer | None:
    """What the busd on ``socket_path`` says to ``hello``; None if none answers.

    A busd that refuses this caller (``[access]``) still runs: its PID is
    then the socket's peer, as the kernel tells it.
    """
    try:
        with _connect(socket_path, timeout) as sock:
            try:
                result = _request(sock, "hello")
            except Refused:
                return Answer(_peer_pid(sock), "", False)
    except (OSError, ProtocolError):
        return None
    if not isinstance(result, dict) or not isinstance(result.get("pid"), int):
        return None
    state = result.get("state")
    return Answer(
        result["pid"],
        state if isinstance(state, str) else "",
        bool(result.get("stopping")),
    )


def call(socket_path: str, op: str, timeout: float) -> Any:
    """Run ``op`` on the busd at ``socket_path``; return its result.

    Raises :class:`Refused` when busd answers with an error, OSError when
    nothing answers.
    """
    with _connect(socket_path, timeout) as sock:
        try:
            return _request(sock, op)
        except ProtocolError as error:
            raise OSError(errno.EPROTO, error.message) from None


def _connect(socket_path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path)
    except OSError:
        sock.close()
        raise
    return sock


def _request(sock: socket.socket, op: str) -> Any:
    sock.sendall(encode_frame({"id": 1, "op": op}))
    decoder = FrameDecoder()
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionResetError(errno.ECONNRESET, "busd closed the connection")
        for answer in decoder.feed(data):
            if isinstance(answer, ProtocolError):
                raise answer
            if isinstance(answer, dict) and answer.get("id") == 1:
                if answer.get("ok"):
                    return answer.get("result")
                error = answer.get("error") or {}
                raise Refused(str(error.get("code")), str(error.get("message")))


def _peer_pid(sock: socket.socket) -> int:
    credentials = sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
    )
    pid: int = struct.unpack("3i", credentials)[0]
    return pid


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` has ended; False if it runs after ``timeout``.

    On a pidfd (Linux 5.3): it becomes readable when the process exits, so
    there is no polling and a zombie nobody reaped counts as gone (it holds
    no socket, lock or file any more). Where there is no pidfd, psutil is
    polled.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError as error:
        if error.errno != errno.ENOSYS:
            raise
        return _poll_gone(pid, timeout)
    try:
        readable, _, _ = select.select([pidfd], [], [], max(timeout, 0))
        return bool(readable)
    finally:
        os.close(pidfd)


def _poll_gone(pid: int, timeout: float) -> bool:
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)  # no pidfd: nothing to wait on but the clock
