"""Per-thread setup and teardown on the bus: the ThreadManager plugin.

Code that owns worker threads publishes ``acquire_thread`` when a thread
begins work and ``release_thread`` when it ends. The manager turns these
into ``start_thread`` and ``stop_thread`` messages carrying a small thread
index, so that listeners can open and close per-thread resources (a
database connection per worker, say) without knowing who made the threads.
When the bus stops, every thread still known is released, so resources of
threads whose owner never published ``release_thread`` are closed too.

This is CherryPy's ``ThreadManager`` with the same channels, methods and
``threads`` table, and three fixes:

- a lock around the table: worker threads acquire and release
  concurrently, and CherryPy's unlocked table can hand two threads the
  same index;
- the table is keyed by the :class:`threading.Thread` object rather than
  its ident. The OS reuses the ident of a thread that ended, so with
  idents a new thread whose predecessor never released is taken for that
  predecessor: it gets no ``start_thread`` and inherits resources opened
  in a dead thread (fatal for thread-bound ones such as sqlite3
  connections);
- indices count up from 1 and are not reused until ``stop`` forgets every
  thread: a released index is not handed to the next thread, as
  ``len(threads) + 1`` does in CherryPy, so two live threads never share
  an index.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from busd.plugins.base import SimplePlugin

if TYPE_CHECKING:
    from busd.bus import Bus

__all__ = ["THREAD_CHANNELS", "ThreadManager"]

#: The channels the manager adds to the bus.
THREAD_CHANNELS = ("acquire_thread", "start_thread", "release_thread", "stop_thread")


class ThreadManager(SimplePlugin):
    """Publish ``start_thread``/``stop_thread`` for threads that come and go.

    ``subscribe()`` listens on ``acquire_thread``, ``release_thread``,
    ``stop`` and ``graceful``. Listeners of ``start_thread`` and
    ``stop_thread`` receive the thread's index (1, 2, ...) and run in the
    thread that acquired or released it (in the bus's thread for ``stop``).
    A thread that ends without releasing keeps its entry until ``stop``.
    """

    def __init__(self, bus: Bus) -> None:
        super().__init__(bus)
        #: {thread: index} of the threads acquired and not released.
        self.threads: dict[threading.Thread, int] = {}
        self._lock = threading.Lock()
        self._last_index = 0
        for channel in THREAD_CHANNELS:
            bus.listeners.setdefault(channel, set())

    def acquire_thread(self) -> None:
        """Publish ``start_thread`` the first time the calling thread calls this.

        Later calls from the same thread (until it is released) do nothing.
        """
        thread = threading.current_thread()
        with self._lock:
            if thread in self.threads:
                return
            self._last_index += 1
            index = self.threads[thread] = self._last_index
        # Publish outside the lock: a listener may acquire or release too.
        self.bus.publish("start_thread", index)

    def release_thread(self) -> None:
        """Forget the calling thread and publish ``stop_thread`` with its index.

        A thread that was not acquired is ignored.
        """
        with self._lock:
            index = self.threads.pop(threading.current_thread(), None)
        if index is not None:
            self.bus.publish("stop_thread", index)

    def stop(self) -> None:
        """Release every known thread, publishing ``stop_thread`` for each.

        Each thread's ``stop_thread`` listeners run even when those of
        another thread failed; the first failure is raised afterwards
        (every failure has already been logged by ``publish``).
        """
        with self._lock:
            indices = sorted(self.threads.values())
            self.threads.clear()
            self._last_index = 0
        failures: list[Exception] = []
        for index in indices:
            try:
                self.bus.publish("stop_thread", index)
            except Exception as failure:
                failures.append(failure)
        if failures:
            raise failures[0]

    graceful = stop
