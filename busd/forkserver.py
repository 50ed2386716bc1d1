"""The fork server: one preloaded process that forks busd's workers.

A worker started as ``python -m busd.worker`` pays for a whole interpreter
start and the imports of busd.worker (about 50 ms of CPU) before it can say
"ready". busd instead starts this process once, first thing in ``busd run``
and in parallel with its own imports; it imports busd.worker and then
forks every worker from itself, which takes a few ms. A forked worker runs
``busd.worker.main`` as if started with that command line (see
``run_worker`` for what is set up first: stdio, session, user, directory,
environment, ``sys.path``).

busd talks to it on a ``SOCK_SEQPACKET`` socket (the file descriptor is
the only argument): one msgpack map per packet, busd -> server::

    {"op": "become", "uid": U, "gid": G, "groups": [...], "umask": M}
    {"op": "spawn", "tag": T, "argv": [...], "env": {...}, "cwd": "/dir",
     "owner": [uid, gid, [groups]] or None, "name": "orders:0"}
                                              + 3 fds: stdin, stdout, stderr
    {"op": "kill", "pid": P, "signal": S}

and server -> busd::

    {"op": "spawned", "tag": T, "pid": P}    or    ..., "error": "..."}
    {"op": "exited", "pid": P, "status": S}  (as Popen.returncode: -N for signal N)

A signal for a worker goes through the server so that it never reaches a
PID that was already reaped and reused. ``become`` makes the server (and so
every later worker) run with busd's own credentials and umask after busd
dropped its privileges: a server left as root would undo that drop.

The server ends when busd closes its end of the socket (or dies: its end
closes then too, and the parent-death signal is a second guard). Workers
still running get their own parent-death signal, SIGTERM, when it ends.
It ignores SIGINT, SIGTERM and SIGHUP: busd stops the workers first, in
order, and only then lets the server go.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import select
import signal
import socket
import sys
import threading
import traceback
from typing import Any  # and preloaded for the workers: most handlers use it

import msgpack

# Preloaded: what every worker imports, and what most handlers build on.
import busd.plugins.base
import busd.worker

MAX_REQUEST = 1 << 20  # a spawn request carries the worker's environment
PR_SET_NAME = 15


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m busd.forkserver FD``."""
    arguments = sys.argv[1:] if argv is None else argv
    if len(arguments) != 1 or not arguments[0].isdigit():
        print("usage: python -m busd.forkserver FD (busd starts this)", file=sys.stderr)
        return 2
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    busd.worker.set_parent_death_signal(signal.SIGKILL)
    set_process_name("busd-forkserver")
    channel = socket.socket(fileno=int(arguments[0]))
    status = ForkServer(channel).serve()
    # Nothing to tidy up, and busd waits for this exit on its way out.
    sys.stderr.flush()
    os._exit(status)


class ForkServer:
    """Serves busd's requests on ``channel`` until busd closes it."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.children: set[int] = set()
        # sys.path without this process's own PYTHONPATH and directory: each
        # worker puts its own in front (run_worker).
        own = set(os.environ.get("PYTHONPATH", "").split(os.pathsep))
        self.base_path = [p for p in sys.path[1:] if p and p not in own]
        self._wakeup_read, wakeup_write = os.pipe()
        os.set_blocking(wakeup_write, False)
        os.set_blocking(self._wakeup_read, False)
        signal.set_wakeup_fd(wakeup_write)
        # A handler, so that SIGCHLD is delivered and wakes select() up.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def serve(self) -> int:
        """Answer requests and report exits; return once busd is gone."""
        watched: list[socket.socket | int] = [self.channel, self._wakeup_read]
        while True:
            readable, _, _ = select.select(watched, [], [])
            if self._wakeup_read in readable:
                while True:
                    try:
                        if not os.read(self._wakeup_read, 512):
                            break
                    except BlockingIOError:
                        break
                self.reap()
            if self.channel in readable:
                try:
                    data, fds, _, _ = socket.recv_fds(self.channel, MAX_REQUEST, 3)
                except ConnectionError:
                    data, fds = b"", []
                if not data:
                    return 0  # busd closed its end: it is done, or gone
                try:
                    self.handle(msgpack.unpackb(data), fds)
                except Exception:
                    # One bad request must not end the server: every worker
                    # would die with it.
                    print("busd fork server: request failed:", file=sys.stderr)
                    traceback.print_exc()
                finally:
                    for fd in fds:
                        os.close(fd)

    def handle(self, request: dict[str, Any], fds: list[int]) -> None:
        """Carry out one request from busd."""
        op = request.get("op")
        if op == "spawn":
            try:
                pid = self.fork(request, fds)
            except OSError as error:
                self.send({"op": "spawned", "tag": request["tag"], "error": str(error)})
                return
            self.children.add(pid)
            self.send({"op": "spawned", "tag": request["tag"], "pid": pid})
        elif op == "kill":
            # Only a child not reaped yet: its PID is still its own.
            if request["pid"] in self.children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(request["pid"], request["signal"])
        elif op == "become":
            try:
                become(request["uid"], request["gid"], request["groups"])
                os.umask(request["umask"])
            except OSError as error:
                # Fail closed: no worker may run with more than busd has.
                print(
                    f"busd fork server: cannot drop privileges: {error}",
                    file=sys.stderr,
                )
                os._exit(1)
        else:
            print(f"busd fork server: unknown request {op!r}", file=sys.stderr)

    def fork(self, request: dict[str, Any], fds: list[int]) -> int:
        """Fork one worker; in the child, run it and never come back here."""
        server = os.getpid()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            return pid
        status = 1
        try:
            status = run_worker(request, fds, server, self.base_path)
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)

    def reap(self) -> None:
        """Collect every child that exited and tell busd its status."""
        while self.children:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            status = os.waitstatus_to_exitcode(wait_status)
            self.send({"op": "exited", "pid": pid, "status": status})

    def send(self, message: dict[str, Any]) -> None:
        """One packet to busd (nothing if busd is gone: serve() ends next)."""
        with contextlib.suppress(OSError):
            self.channel.send(msgpack.packb(message))


def set_process_name(name: str) -> None:
    """Name this process in ``ps -o comm``, ``top`` and ``pstree``.

    Forked, every worker has the server's command line; this name (the
    first 15 bytes) tells them apart. Best effort: no name is no harm.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def become(uid: int, gid: int, groups: list[int]) -> None:
    """Take these credentials (root can; anyone else has them already)."""
    if os.geteuid() == 0 and (uid, gid) != (0, 0):
        set_credentials(uid, gid, groups)


def set_credentials(uid: int, gid: int, groups: list[int]) -> None:
    """Groups, then group, then user: after setuid() the others are denied."""
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)


def run_worker(
    request: dict[str, Any], fds: list[int], server: int, base_path: list[str]
) -> int:
    """In a freshly forked child: become the worker and run it.

    Sets up what ``subprocess`` would for ``python -m busd.worker``: the
    three pipes as stdio and no other file open, a session of its own, the
    broker's user, directory and environment, then ``sys.path`` as the
    interpreter builds it (the directory, then PYTHONPATH). The parent-death
    signal is set against this server.
    """
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    os.setsid()
    set_process_name(request.get("name") or "busd-worker")
    owner = request.get("owner")
    if owner is not None:
        set_credentials(*owner)
    cwd = request["cwd"]
    env = request["env"]
    try:
        os.chdir(cwd)
    except OSError as error:
        print(f"error: cannot change to directory {cwd!r}: {error}", file=sys.stderr)
        return 1
    os.environ.clear()
    os.environ.update(env)
    entries = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [cwd, *entries, *base_path]
    sys.argv = [busd.worker.__file__, *request["argv"]]
    status = busd.worker.main(request["argv"], parent=server)
    # What the interpreter does at its end, since os._exit() skips it.
    # Private, and so not in typeshed; multiprocessing calls it the same way.
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
