"""busd's I/O thread: one asyncio loop for clients, worker pipes and timers.

``IOLoop`` is a bus plugin. On ``start`` (before the control socket is
bound) it starts the loop on a thread of its own, named ``busd-io``, with
the :class:`~busd.outbox.Outbox` that gathers every write of a loop turn;
on ``stop`` (after everything that uses it) it stops and closes it. The
loop is made at ``start``, not before: ``busd start`` forks (the
Daemonizer) earlier in the start, and a loop must not cross a fork.

Bus listeners run on the main thread; they hand work to the loop with
:meth:`run` (and wait for it) or :meth:`call_soon` (and do not).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from busd.outbox import Outbox
from busd.plugins.base import SimplePlugin

# Before the control server binds its socket (75): it serves on this loop.
START_PRIORITY = 74
# After the control server (90) closed its clients on this loop.
STOP_PRIORITY = 95
# How long stop waits for the thread to end.
JOIN_TIMEOUT = 10.0

T = TypeVar("T")


class IOLoop(SimplePlugin):
    """The I/O loop on its own thread, and the ways to hand it work."""

    def __init__(self, bus: Any) -> None:
        super().__init__(bus)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._outbox: Outbox | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- bus listeners (main thread) ---------------------------------------------

    def start(self) -> None:
        """Start the loop on the ``busd-io`` thread."""
        loop = self.loop = asyncio.new_event_loop()
        self._outbox = Outbox(loop)
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(loop, ready), name="busd-io", daemon=True
        )
        self._thread.start()
        ready.wait()

    start.priority = START_PRIORITY  # type: ignore[attr-defined]

    def stop(self) -> None:
        """Stop the loop and its thread."""
        loop = self.loop
        if loop is None:
            return
        self.loop = None
        with contextlib.suppress(RuntimeError):  # closed already
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT)
        loop.close()

    stop.priority = STOP_PRIORITY  # type: ignore[attr-defined]

    def _run(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        # A method, not a static one: profilers name the I/O thread's frame
        # "IOLoop._run" from its ``self`` (bench/ filters py-spy samples so).
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()

    # -- handing it work ------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the loop runs (between start and stop)."""
        return self.loop is not None

    @property
    def outbox(self) -> Outbox:
        """Gathers the writes of each loop turn (clients and workers)."""
        assert self._outbox is not None, "the I/O loop is not started"
        return self._outbox

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coroutine`` on the loop and wait for its result (main thread)."""
        assert self.loop is not None, "the I/O loop is not running"
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` on the loop, from any thread (if it runs)."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closing
                loop.call_soon_threadsafe(callback, *args)

    def background(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coroutine`` as a task on the loop (from the loop), keeping
        it referenced until it is done."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
