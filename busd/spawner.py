"""busd's side of the fork server: start it, and start workers through it.

The fork server (busd/forkserver.py) is a child of busd that has imported
busd.worker once and forks each worker from itself, so a worker is ready
in a few ms instead of an interpreter start later. ``Spawner.launch()``
starts it; ``busd run`` does so before its own imports, so that both
interpreters start at the same time. Everything else here runs on busd's
I/O loop: ``spawn()`` hands the server three pipe ends and gets a
:class:`WorkerProcess` back: the worker's PID and a pidfd for it.

A worker is busd's own child from the moment busd hears of it (the server
hands it over, busd/forkserver.py): busd signals it through its pidfd and
reaps it with ``waitid`` on that pidfd; the server never does either. If
the server dies, no worker notices: the spawns it had not answered fail
with :class:`ForkServerGone` (to be tried again on a new server, see
busd/supervision/forkservers.py), and ``on_lost`` hears of its exit.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import signal
import socket
import subprocess
import sys

import msgpack

import busd

# ``busd run`` starts the fork server before it imports asyncio (about 20
# ms): the server's start should overlap busd's, not follow it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable
    from typing import Any

log = logging.getLogger("busd.broker")

MAX_MESSAGE = 1 << 16  # what the server sends is small
CLOSE_WAIT = 5.0
#: Environment variable marking busd's workers (and fork server) with
#: busd's identity, its socket path: the orphan search at start looks for it.
ORPHAN_MARK = "BUSD_DAEMON"


#: Where ``import busd`` works from: first on the fork server's PYTHONPATH,
#: and on each handler worker's.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(busd.__file__)))


def server_environment(identity: str) -> dict[str, str]:
    """The fork server's environment: busd's, and what the server needs.

    It must find busd (the directory holding the package goes first on
    PYTHONPATH), know busd's PID, and carry the orphan mark.
    """
    env = dict(os.environ)
    own = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, own) if p)
    env["BUSD_PID"] = str(os.getpid())
    env[ORPHAN_MARK] = identity
    return env


def current_umask() -> int:
    """This process's umask, read without changing it (Linux /proc)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    # Without /proc: set and set back (not thread-safe, hence the second choice).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class SpawnError(OSError):
    """The fork server could not start a worker (or is gone)."""


class ForkServerGone(SpawnError):
    """The fork server died before it answered: try on a new one."""


def exit_code(result: os.waitid_result) -> int:
    """A ``waitid`` result as ``Popen.returncode``: -N for signal N."""
    if result.si_code == os.CLD_EXITED:
        return result.si_status
    return -result.si_status


class WorkerProcess:
    """A worker forked by the fork server and adopted by busd.

    The same few parts ``asyncio.subprocess.Process`` offers. busd holds a
    pidfd for it: signals go through it (never to a reused PID), and its
    exit is read on the loop with ``waitid`` on it, busd being its parent.
    """

    def __init__(
        self,
        pid: int,
        pidfd: int,
        loop: asyncio.AbstractEventLoop,
        registry: dict[int, WorkerProcess],
    ) -> None:
        self.pid = pid
        #: The exit status as ``Popen.returncode`` (-N: signal N) once it
        #: exited; it stays None if busd could not collect it.
        self.returncode: int | None = None
        self.stdin: asyncio.WriteTransport | None = None
        self.stderr: asyncio.StreamReader | None = None
        #: Our ends of its stdin, stdout and stderr until connect().
        self.pipes: tuple[int, int, int] | None = None
        self._pidfd: int | None = pidfd
        self._loop = loop
        self._registry = registry
        self._exit: asyncio.Future[int | None] = loop.create_future()
        registry[pid] = self
        loop.add_reader(pidfd, self._collect)

    async def connect(self, stdout: asyncio.Protocol, stderr_limit: int) -> None:
        """Start reading its stdout (with ``stdout``) and stderr, and writing
        its stdin. ``stderr`` is then a StreamReader for lines of up to
        ``stderr_limit`` bytes."""
        import asyncio

        assert self.pipes is not None, "connect() once, after spawn()"
        stdin, stdout_read, stderr_read = self.pipes
        self.pipes = None
        loop = asyncio.get_running_loop()
        # The transports own these files and close them with the pipes.
        self.stdin, _ = await loop.connect_write_pipe(
            asyncio.Protocol, os.fdopen(stdin, "wb", buffering=0)
        )
        await loop.connect_read_pipe(
            lambda: stdout, os.fdopen(stdout_read, "rb", buffering=0)
        )
        reader = asyncio.StreamReader(limit=stderr_limit, loop=loop)
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader, loop=loop),
            os.fdopen(stderr_read, "rb", buffering=0),
        )
        self.stderr = reader

    async def wait(self) -> int | None:
        """The exit status (None: unknown, it was not busd's to collect)."""
        return await self._exit

    def send_signal(self, signum: int) -> None:
        """Signal the worker, unless busd reaped it already."""
        if self._pidfd is not None:
            # ProcessLookupError: exited; its exit is being collected.
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signum)

    def _collect(self) -> None:
        """Its pidfd is readable: it exited; reap it (on the loop)."""
        assert self._pidfd is not None
        try:
            result = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            # Not busd's child: busd was no subreaper when it was forked.
            status = None
        else:
            if result is None:
                return  # not a zombie yet
            status = exit_code(result)
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        self._registry.pop(self.pid, None)
        self.returncode = status
        if not self._exit.done():
            self._exit.set_result(status)


class Spawner:
    """One fork server, seen from busd."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        channel: socket.socket,
        mark: str | None = None,
    ) -> None:
        self.process = process
        self.channel = channel
        #: The orphan mark its workers carry: busd's socket path.
        self.mark = mark
        #: True once the channel is closed: no more spawns here.
        self.gone = False
        #: Whether it took busd's credentials yet (``become``).
        self.became = False
        #: Its exit status once busd collected it.
        self.returncode: int | None = None
        #: Whether busd collected its exit (after it died, or wait_closed).
        self.reaped = False
        self._pidfd: int | None = _pidfd_of(process.pid)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_lost: Callable[[Spawner], None] | None = None
        self._workers: dict[int, WorkerProcess] = {}
        self._tags = itertools.count(1)
        self._spawning: dict[int, asyncio.Future[WorkerProcess]] = {}

    @classmethod
    def launch(cls, env: dict[str, str]) -> Spawner:
        """Start ``python -m busd.forkserver`` with ``env``; return at once.

        ``env`` must let it import busd and carry busd's PID (``BUSD_PID``)
        and the orphan mark: every worker it forks shows that environment
        in /proc, as its own.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "busd.forkserver", str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                pass_fds=[theirs.fileno()],
                env=env,
                # Out of busd's process group: a Ctrl-C in busd's terminal is
                # for busd, which then stops the workers in order.
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(process, ours, env.get(ORPHAN_MARK))

    @property
    def pid(self) -> int:
        """The fork server's PID."""
        return self.process.pid

    @property
    def spawning(self) -> int:
        """How many spawns it has not answered yet."""
        return len(self._spawning)

    def become(self, uid: int, gid: int, groups: list[int], umask: int) -> None:
        """Have the server (and its later workers) take these credentials."""
        self._send(
            {"op": "become", "uid": uid, "gid": gid, "groups": groups, "umask": umask}
        )
        self.became = True

    def _send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        socket.send_fds(self.channel, [msgpack.packb(message)], fds or [])

    # -- on the I/O loop -------------------------------------------------------

    def attach(
        self,
        loop: asyncio.AbstractEventLoop,
        on_lost: Callable[[Spawner], None] | None = None,
        workers: dict[int, WorkerProcess] | None = None,
    ) -> None:
        """Read the server's answers on ``loop`` from now on.

        ``on_lost(spawner)`` is called on the loop once the server died and
        was reaped (not after ``close()``); ``workers`` is where each live
        worker is registered by PID, shared by every server of one busd.
        """
        if self._loop is None:
            self._loop = loop
            self._on_lost = on_lost
            if workers is not None:
                self._workers = workers
            loop.add_reader(self.channel, self._read)

    async def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        owner: tuple[int, int, list[int]] | None,
        name: str = "",
    ) -> WorkerProcess:
        """Fork a worker running ``busd.worker.main(argv)``.

        It runs in ``cwd`` with exactly ``env``, as ``owner`` (uid, gid,
        groups) if given, named ``name`` in ``ps -o comm``. Its pipes are
        open but not read yet: see :meth:`WorkerProcess.connect`. Raises
        ForkServerGone if the server is gone (or dies before answering),
        SpawnError if it cannot fork the worker.
        """
        import asyncio

        if self.gone:
            raise ForkServerGone("the fork server is gone")
        loop = asyncio.get_running_loop()
        self.attach(loop)
        stdin_read, stdin_write = os.pipe()
        stdout_read, stdout_write = os.pipe()
        stderr_read, stderr_write = os.pipe()
        ours = (stdin_write, stdout_read, stderr_read)
        tag = next(self._tags)
        answer: asyncio.Future[WorkerProcess] = loop.create_future()
        self._spawning[tag] = answer
        request = {"op": "spawn", "tag": tag, "argv": argv, "env": env, "cwd": cwd}
        request.update(owner=owner, name=name)
        try:
            self._send(request, [stdin_read, stdout_write, stderr_write])
        except OSError as error:
            self._spawning.pop(tag, None)
            for fd in ours:
                os.close(fd)
            # It is gone (its end closed): say so now, or the next spawn
            # would try the same dead server before _read sees the EOF.
            self._lost()
            raise ForkServerGone(f"cannot reach the fork server: {error}") from None
        finally:
            for fd in (stdin_read, stdout_write, stderr_write):
                os.close(fd)
        try:
            process = await answer
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        process.pipes = ours
        return process

    def _read(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self.channel, MAX_MESSAGE, 1)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if not data:
            self._lost()
            return
        report = msgpack.unpackb(data)
        answer = self._spawning.pop(report.get("tag"), None)
        if report.get("op") != "spawned" or "error" in report or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            if answer is not None and not answer.done():
                error = report.get("error", f"unexpected answer {report!r}")
                answer.set_exception(SpawnError(error))
            return
        assert self._loop is not None
        process = WorkerProcess(report["pid"], fds[0], self._loop, self._workers)
        if answer is not None and not answer.done():
            answer.set_result(process)
        else:  # the spawn was cancelled: nobody will run this worker
            process.send_signal(signal.SIGKILL)

    def _lost(self) -> None:
        """The server closed its end: it died. Its workers live on."""
        if self.gone:
            return
        self.close("the fork server died")
        if self._pidfd is not None and self._loop is not None:
            # Its exit status, once it is fully gone (a moment after EOF).
            self._loop.add_reader(self._pidfd, self._reaped)
        else:
            self._reaped()

    def _reaped(self) -> None:
        """The server's process exited: collect it, tell ``on_lost``."""
        if self._pidfd is not None and self._loop is not None:
            self._loop.remove_reader(self._pidfd)
        self.returncode = self.process.poll()
        if self.returncode is None:
            return  # readable, yet not collectable: wait_closed() ends it
        self.reaped = True
        self._close_pidfd()
        if self._on_lost is not None:
            self._on_lost(self)

    def close(self, why: str = "busd let the fork server go") -> None:
        """Let the server go (it ends once its end reads EOF).

        A spawn it has not answered fails with ForkServerGone(``why``). On
        the I/O loop once it read from the server; see ``wait_closed``.
        """
        if self.gone:
            return
        self.gone = True
        if self._loop is not None:
            self._loop.remove_reader(self.channel)
        self.channel.close()
        for answer in self._spawning.values():
            if not answer.done():
                answer.set_exception(ForkServerGone(why))
        self._spawning.clear()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def wait_closed(self, timeout: float = CLOSE_WAIT) -> None:
        """Wait until the server has exited (it does once ``close``d)."""
        # A pidfd wakes us the moment it exits; Popen.wait(timeout) would
        # poll with sleeps of up to 50 ms, on busd's path to exit.
        pidfd = self._pidfd
        if pidfd is not None and self.process.poll() is None:
            select.select([pidfd], [], [], timeout)
        if self.process.poll() is None:
            try:
                self.process.wait(0 if pidfd is not None else timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "The fork server (PID %d) did not exit; killing it", self.pid
                )
                self.process.kill()
                self.process.wait()
        self.returncode = self.process.returncode
        self.reaped = True
        if self._loop is None or not self._loop.is_running():
            self._close_pidfd()


def _pidfd_of(pid: int) -> int | None:
    """A pidfd for ``pid`` (our unreaped child), or None on an old kernel."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
