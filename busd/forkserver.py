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

and server -> busd::

    {"op": "spawned", "tag": T, "pid": P}  + 1 fd: a pidfd of the worker
    {"op": "spawned", "tag": T, "error": "..."}

**Workers are handed to busd at birth.** The server forks a short-lived
middle process, which forks the worker, opens a pidfd for it (its own
child: the PID cannot have been reused) and exits; busd is a child
subreaper (busd/subreaper.py), so the kernel re-parents the worker to busd
as the middle process ends. The server waits for that exit before it
reports, so when busd reads "spawned" the worker is already its child:
busd alone reaps it (``waitid`` on the pidfd) and signals it (the pidfd:
no reused PID is ever hit). The server's own death therefore touches no
worker, and it never reaps one. The worker waits for that adoption, then
sets its parent-death signal against busd itself (busd.worker.main): a
worker dies with busd, never with the fork server.

``become`` makes the server (and so every later worker) run with busd's
own credentials and umask after busd dropped its privileges: a server left
as root would undo that drop.

The server ends when busd closes its end of the socket (or dies: its end
closes then too, and the parent-death signal is a second guard). It
ignores SIGINT, SIGTERM and SIGHUP: busd stops the workers first, in
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
    status = ForkServer(channel, os.getppid()).serve()
    # Nothing to tidy up, and busd waits for this exit on its way out.
    sys.stderr.flush()
    os._exit(status)


class ForkServer:
    """Serves busd's requests on ``channel`` until busd closes it."""

    def __init__(self, channel: socket.socket, busd_pid: int) -> None:
        self.channel = channel
        #: The process that adopts every worker (busd, a child subreaper).
        self.busd_pid = busd_pid
        # sys.path without this process's own PYTHONPATH and directory: each
        # worker puts its own in front (run_worker).
        own = set(os.environ.get("PYTHONPATH", "").split(os.pathsep))
        self.base_path = [p for p in sys.path[1:] if p and p not in own]

    def serve(self) -> int:
        """Answer requests; return once busd is gone."""
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.channel, MAX_REQUEST, 3)
            except ConnectionError:
                data, fds = b"", []
            if not data:
                return 0  # busd closed its end: it is done, or gone
            try:
                self.handle(msgpack.unpackb(data), fds)
            except Exception:
                # One bad request must not end the server.
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
                pid, pidfd = self.fork(request, fds)
            except OSError as error:
                self.send({"op": "spawned", "tag": request["tag"], "error": str(error)})
                return
            try:
                self.send({"op": "spawned", "tag": request["tag"], "pid": pid}, [pidfd])
            finally:
                os.close(pidfd)
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

    def fork(self, request: dict[str, Any], fds: list[int]) -> tuple[int, int]:
        """Fork one worker through a middle process; its PID and a pidfd.

        Returns once the middle process has exited, so the worker is busd's
        child by then (module docstring). Raises OSError if no worker came.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        sys.stderr.flush()
        try:
            middle = os.fork()
            if not middle:
                ours.close()
                self._middle(request, fds, theirs)  # never returns
            theirs.close()
            _, wait_status = os.waitpid(middle, 0)
            try:
                data, pidfds, _, _ = socket.recv_fds(ours, 64, 1, socket.MSG_DONTWAIT)
            except BlockingIOError:
                data, pidfds = b"", []
        finally:
            ours.close()
            with contextlib.suppress(OSError):
                theirs.close()
        if not data or len(pidfds) != 1:
            for fd in pidfds:
                os.close(fd)
            status = os.waitstatus_to_exitcode(wait_status)
            raise OSError(f"the worker could not be forked (status {status})")
        return int(data), pidfds[0]

    def _middle(
        self, request: dict[str, Any], fds: list[int], report: socket.socket
    ) -> None:
        """In the middle process: fork the worker, report it, exit."""
        status = 1
        try:
            middle = os.getpid()
            worker = os.fork()
            if not worker:
                report.close()
                self._worker(request, fds, middle)  # never returns
            pidfd = os.pidfd_open(worker)
            socket.send_fds(report, [str(worker).encode()], [pidfd])
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)

    def _worker(self, request: dict[str, Any], fds: list[int], middle: int) -> None:
        """In the worker: run it, and never come back here."""
        status = 1
        try:
            await_adoption(middle)
            status = run_worker(request, fds, self.busd_pid, self.base_path)
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        """One packet to busd (nothing if busd is gone: serve() ends next)."""
        with contextlib.suppress(OSError):
            socket.send_fds(self.channel, [msgpack.packb(message)], fds or [])


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


def await_adoption(middle: int) -> None:
    """Wait until ``middle``, this process's parent, is gone.

    The middle process exits at once; the kernel re-parents this process
    (to busd, a child subreaper) before that exit is visible on a pidfd.
    Whoever the new parent is, the parent-death check in busd.worker.main
    then ends this process unless it is busd.
    """
    if os.getppid() != middle:
        return  # re-parented already
    try:
        pidfd = os.pidfd_open(middle)
    except ProcessLookupError:
        return  # gone already: re-parented
    try:
        # Still the parent after the pidfd was opened: the pidfd is the
        # middle process's, not a reused PID's.
        if os.getppid() == middle:
            select.select([pidfd], [], [])
    finally:
        os.close(pidfd)


def run_worker(
    request: dict[str, Any], fds: list[int], busd_pid: int, base_path: list[str]
) -> int:
    """In a freshly forked child: become the worker and run it.

    Sets up what ``subprocess`` would for ``python -m busd.worker``: the
    three pipes as stdio and no other file open, a session of its own, the
    broker's user, directory and environment, then ``sys.path`` as the
    interpreter builds it (the directory, then PYTHONPATH). It is busd's
    child by now (``await_adoption``); the parent-death signal is set
    against busd (``busd.worker.main``), which ends it if busd is not its
    parent.
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
    status = busd.worker.main(request["argv"], parent=busd_pid)
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
