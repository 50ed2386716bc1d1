"""busd's side of the fork server: start it, and start workers through it.

The fork server (busd/forkserver.py) is a child of busd that has imported
busd.worker once and forks each worker from itself, so a worker is ready
in a few ms instead of an interpreter start later. ``Spawner.launch()``
starts it; ``busd run`` does so before its own imports, so that both
interpreters start at the same time. Everything else here runs on busd's
I/O loop: ``spawn()`` hands the server three pipe ends and gets a
:class:`WorkerProcess` back, whose exit status the server reports.

If the server dies, its workers die too (their parent-death signal):
their instances see an exit of unknown status, and the next ``spawn()``
starts a new server.
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


class WorkerProcess:
    """A worker forked by the fork server: its pipes, its exit, its signals.

    The same few parts ``asyncio.subprocess.Process`` offers, for a process
    that is not busd's own child.
    """

    def __init__(self, spawner: Spawner, pid: int) -> None:
        self.spawner = spawner
        self.pid = pid
        #: The exit status as ``Popen.returncode`` (-N: signal N) once it
        #: exited; it stays None when the fork server died first.
        self.returncode: int | None = None
        self.stdin: asyncio.WriteTransport | None = None
        self.stderr: asyncio.StreamReader | None = None
        #: Our ends of its stdin, stdout and stderr until connect().
        self.pipes: tuple[int, int, int] | None = None
        self._exit: asyncio.Future[int | None] = (
            spawner.loop_for_workers().create_future()
        )

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
        """The exit status (None: unknown, the fork server died first)."""
        return await self._exit

    def send_signal(self, signum: int) -> None:
        """Signal the worker, unless it exited already."""
        if not self._exit.done():
            self.spawner.kill(self.pid, signum)

    def exited(self, status: int | None) -> None:
        """The fork server reported the exit (or is gone: None)."""
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
        self.gone = False
        #: Whether it took busd's credentials yet (``become``).
        self.became = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tags = itertools.count(1)
        self._spawning: dict[int, asyncio.Future[WorkerProcess]] = {}
        self._processes: dict[int, WorkerProcess] = {}

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

    def become(self, uid: int, gid: int, groups: list[int], umask: int) -> None:
        """Have the server (and its later workers) take these credentials."""
        self._send(
            {"op": "become", "uid": uid, "gid": gid, "groups": groups, "umask": umask}
        )
        self.became = True

    def _send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        socket.send_fds(self.channel, [msgpack.packb(message)], fds or [])

    # -- on the I/O loop -------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the server's reports on ``loop`` from now on."""
        if self._loop is None:
            self._loop = loop
            loop.add_reader(self.channel, self._read)

    def loop_for_workers(self) -> asyncio.AbstractEventLoop:
        """The loop the server's reports are read on."""
        assert self._loop is not None, "attach() the spawner to a loop first"
        return self._loop

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
        SpawnError if the server cannot fork it or is gone.
        """
        import asyncio

        if self.gone:
            raise SpawnError("the fork server is gone")
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
            raise SpawnError(f"cannot reach the fork server: {error}") from None
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

    def kill(self, pid: int, signum: int) -> None:
        """Signal worker ``pid`` through the server (directly if it is gone)."""
        if self.gone:
            # Its workers had their parent-death signal; this is for one
            # that ignores it (its pipes are still open, so it is alive).
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
            return
        # If it is gone, _read sees that and ends everything.
        with contextlib.suppress(OSError):
            self._send({"op": "kill", "pid": pid, "signal": int(signum)})

    def _read(self) -> None:
        try:
            data = self.channel.recv(MAX_MESSAGE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lost()
            return
        report = msgpack.unpackb(data)
        op = report.get("op")
        if op == "spawned":
            answer = self._spawning.pop(report["tag"], None)
            if "error" in report:
                if answer is not None and not answer.done():
                    answer.set_exception(SpawnError(report["error"]))
                return
            process = WorkerProcess(self, report["pid"])
            self._processes[process.pid] = process
            if answer is not None and not answer.done():
                answer.set_result(process)
            else:  # the spawn was cancelled: nobody will run this worker
                self.kill(process.pid, signal.SIGKILL)
        elif op == "exited":
            exited = self._processes.pop(report["pid"], None)
            if exited is not None:
                exited.exited(report["status"])

    def _lost(self) -> None:
        """The server is gone: every worker's exit is unknown from here."""
        if self.gone:
            return
        self.close()
        status = self.process.poll()
        log.error(
            "The fork server (PID %d) is gone%s; its %d workers end with it",
            self.process.pid,
            "" if status is None else f" ({status})",
            len(self._processes),
        )
        for answer in self._spawning.values():
            if not answer.done():
                answer.set_exception(SpawnError("the fork server is gone"))
        self._spawning.clear()
        for process in self._processes.values():
            process.exited(None)
        self._processes.clear()
        if status is None and self._loop is not None:
            # Collect it off the loop: it may take a moment to be gone.
            self._loop.run_in_executor(None, self.process.wait)

    def close(self) -> None:
        """Let the server go (its workers should be stopped by now).

        On the I/O loop once it read from the server; see ``wait_closed``.
        """
        if self.gone:
            return
        self.gone = True
        if self._loop is not None:
            self._loop.remove_reader(self.channel)
        self.channel.close()

    def wait_closed(self, timeout: float = CLOSE_WAIT) -> None:
        """Wait until the server has exited (it does once ``close``d)."""
        # A pidfd wakes us the moment it exits; Popen.wait(timeout) would
        # poll with sleeps of up to 50 ms, on busd's path to exit.
        try:
            pidfd = os.pidfd_open(self.process.pid)
        except (AttributeError, OSError):
            pidfd = None  # gone and reaped already, or an old kernel
        if pidfd is not None:
            try:
                select.select([pidfd], [], [], timeout)
            finally:
                os.close(pidfd)
        if self.process.poll() is None:
            try:
                self.process.wait(0 if pidfd is not None else timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "The fork server (PID %d) did not exit; killing it", self.pid
                )
                self.process.kill()
                self.process.wait()
