"""busd's fork server, kept running: started when needed, and restarted
with a back-off of its own when it dies.

The fork server's death is nobody else's failure. The workers it forked
are busd's children (busd/forkserver.py) and run on; a spawn it had not
answered is tried again on the next server (``WorkerLauncher``), and no
instance is charged for it. Its own restarts back off: the first comes
after ``first`` seconds, each next one after twice as long up to ``cap``,
and a server that served ``stable`` seconds starts the count again. Each
death is one log line, with its PID, its exit and the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any, NamedTuple

from busd.spawner import (
    Spawner,
    SpawnError,
    WorkerProcess,
    current_umask,
    server_environment,
)
from busd.subreaper import StrayReaper, become_subreaper
from busd.supervision.pipes import describe_status

log = logging.getLogger("busd")


class ForkServerTiming(NamedTuple):
    """How soon a dead fork server is replaced."""

    #: The delay before the first restart; it doubles up to ``cap``.
    first: float = 0.1
    cap: float = 10.0
    #: A server that lived this long restarts the doubling at ``first``.
    stable: float = 30.0


DEFAULT_TIMING = ForkServerTiming()


class ForkServers:
    """The current fork server of one busd, and its restarts."""

    def __init__(
        self,
        identity: str,
        spawner: Spawner | None = None,
        timing: ForkServerTiming = DEFAULT_TIMING,
    ) -> None:
        """``identity``: busd's socket path (the orphan mark); ``spawner``:
        a fork server ``busd run`` started already."""
        self.identity = identity
        self.timing = timing
        #: Every live worker by PID (the strays' sweep leaves them alone).
        self.workers: dict[int, WorkerProcess] = {}
        #: Restarts after a death, dead servers' exits in a row.
        self.restarts = 0
        self.failures = 0
        self.last_exit: str | None = None
        #: When the next server starts (time.time()), while one is due.
        self.next_start: float | None = None
        self._spawner = spawner
        self._started = time.monotonic()
        self._pids: set[int] = set() if spawner is None else {spawner.pid}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Condition | None = None
        self._restart: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._reaper: StrayReaper | None = None
        self.closed = False
        #: The process that made itself a subreaper (busd, once current()).
        self._subreaper: int | None = None

    # -- the current server -------------------------------------------------------

    def current(self) -> Spawner:
        """The running server, started now if there is none and none is due.

        Before any worker, it takes busd's credentials and umask, which are
        final once the privilege drop is done (this runs after it).
        """
        if self._subreaper != os.getpid():
            # Here, not when made: ``busd start`` forks after that, and the
            # mark is not inherited. A server started before it (by ``busd
            # run``) and its children are covered: the kernel marks them.
            become_subreaper()
            self._subreaper = os.getpid()
        spawner = self._spawner
        if spawner is None or (spawner.gone and self._restart is None):
            spawner = self._start()
        if not spawner.became:
            spawner.become(os.getuid(), os.getgid(), os.getgroups(), current_umask())
        return spawner

    def pid(self) -> int | None:
        """The running server's PID (None while there is none)."""
        if self._spawner is None or self._spawner.gone:
            return None
        return self._spawner.pid

    def state(self) -> dict[str, Any]:
        """For ``busctl state``: restarts, the last death, the next start."""
        return {
            "pid": self.pid(),
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "next_start": self.next_start,
        }

    def _start(self) -> Spawner:
        spawner = Spawner.launch(server_environment(self.identity))
        self._spawner = spawner
        self._pids.add(spawner.pid)
        self._started = time.monotonic()
        spawner.become(os.getuid(), os.getgid(), os.getgroups(), current_umask())
        if self._loop is not None:
            spawner.attach(self._loop, self._lost, self.workers)
        return spawner

    def claimed(self, pid: int) -> bool:
        """Whether busd collects child ``pid`` itself (a worker, a server)."""
        return pid in self.workers or pid in self._pids

    # -- on the I/O loop ----------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch the servers and sweep strays on ``loop`` from now on."""
        if self._loop is not None:
            return
        self._loop = loop
        self._changed = asyncio.Condition()
        if self._spawner is not None:
            self._spawner.attach(loop, self._lost, self.workers)
        self._reaper = StrayReaper(loop, self.claimed)
        self._reaper.start()

    async def ready(self, deadline: float) -> Spawner:
        """The running server; waits for a restart that is due, until
        ``deadline`` (loop time). Raises SpawnError when busd is stopping or
        no server came in time."""
        loop = asyncio.get_running_loop()
        self.attach(loop)
        assert self._changed is not None
        async with self._changed:
            while True:
                if self.closed:
                    raise SpawnError("busd is stopping")
                spawner = self._spawner
                dying = spawner is not None and spawner.gone and not spawner.reaped
                if self._restart is None and not dying:
                    try:
                        return self.current()
                    except OSError as error:
                        self._died(None, f"cannot start: {error}")
                left = deadline - loop.time()
                if left <= 0:
                    raise SpawnError(
                        f"no fork server in time (the last one: {self.last_exit})"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)

    def _lost(self, spawner: Spawner) -> None:
        """A server died (it was reaped): plan the next one."""
        self._pids.discard(spawner.pid)
        if spawner is not self._spawner or self.closed:
            return
        status = spawner.returncode
        cause = "exit status unknown" if status is None else describe_status(status)
        self._died(spawner, cause)

    def _died(self, spawner: Spawner | None, cause: str) -> None:
        assert self._loop is not None
        lived = time.monotonic() - self._started
        if lived >= self.timing.stable:
            self.failures = 0
        self.failures += 1
        timing = self.timing
        delay = min(timing.cap, timing.first * 2 ** (self.failures - 1))
        self.last_exit = cause
        self.next_start = time.time() + delay
        running = len(self.workers)
        if spawner is None:
            log.error("The fork server %s; trying again in %g s", cause, delay)
        else:
            log.error(
                "The fork server (PID %d) died (%s) after %.1f s; its %d running "
                "workers carry on; a new one starts in %g s",
                spawner.pid,
                cause,
                lived,
                running,
                delay,
            )
        self._restart = self._loop.call_later(delay, self._start_again)

    def _start_again(self) -> None:
        self._restart = None
        self.next_start = None
        if self.closed:
            return
        try:
            spawner = self._start()
        except OSError as error:
            self._died(None, f"cannot start: {error}")
        else:
            self.restarts += 1
            log.info(
                "The fork server is back: PID %d (restart %d)",
                spawner.pid,
                self.restarts,
            )
        self._wake()

    def _wake(self) -> None:
        changed = self._changed
        if changed is None:
            return

        async def notify() -> None:
            async with changed:
                changed.notify_all()

        task = asyncio.ensure_future(notify())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        """Let the server go (on the I/O loop; the workers are stopped)."""
        self.closed = True
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
        if self._reaper is not None:
            self._reaper.stop()
        if self._spawner is not None:
            self._spawner.close()
        self._wake()

    def wait_closed(self) -> None:
        """Wait until the server has exited (main thread, at stop)."""
        self.closed = True
        if self._spawner is not None:
            self._spawner.close()  # no-op if close() ran on the loop
            self._spawner.wait_closed()
            self._spawner = None
