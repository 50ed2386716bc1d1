"""Periodic work: a repeating background thread and a bus plugin that runs one.

:class:`BackgroundTask` is a daemon thread that calls a function every
``interval`` seconds until :meth:`~BackgroundTask.cancel` is called.
:class:`Monitor` ties such a task to the bus: it starts with the bus,
stops with it and restarts on ``graceful``.

Both keep the names and arguments of CherryPy's classes of the same name
(``interval``, ``function``, ``args``, ``kwargs``, ``bus``, ``running``;
``callback``, ``frequency``, ``thread``, ``name``), so code written for
CherryPy works unchanged. Two behaviours differ on purpose:

- the task waits on a :class:`threading.Event`, so ``cancel()`` ends the
  wait at once instead of after the current ``time.sleep(interval)``;
- when the function raises, the error is logged (with its traceback) and
  the task carries on at the next interval. CherryPy's task thread dies on
  the first error, which silently turns a monitor off for the rest of the
  process's life; a transient failure (a full disk, a lost connection)
  should not do that. A function that wants to stop its task can call
  ``cancel()``; ``KeyboardInterrupt`` and ``SystemExit`` still end it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from busd.plugins.base import SimplePlugin

if TYPE_CHECKING:
    from busd.bus import Bus

__all__ = ["MONITOR_START_PRIORITY", "BackgroundTask", "Monitor"]

# CherryPy's value, kept so that mixed plugin sets order the same way: the
# monitor starts after the ordinary services (50) it usually watches, and
# after a Daemonizer (65) so that its thread lives in the final process.
MONITOR_START_PRIORITY = 70

_logger = logging.getLogger(__name__)


class BackgroundTask(threading.Thread):
    """A daemon thread that calls ``function`` every ``interval`` seconds.

    The first call happens one interval after ``start()``; the next
    interval is counted from the end of the previous call, so slow calls
    never pile up. ``cancel()`` takes effect immediately when the thread is
    waiting, and right after the current call when it is running one.

    An exception from ``function`` is logged on ``bus`` (at ERROR, with
    the traceback; on this module's logger when there is no bus) and the
    task keeps running. See the module docstring for why this differs from
    CherryPy.
    """

    def __init__(
        self,
        interval: float,
        function: Callable[..., Any],
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        bus: Bus | None = None,
        *,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.interval = interval
        self.function = function
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.bus = bus
        #: True from the moment the thread runs until ``cancel()``.
        self.running = False
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop repeating; a call in progress finishes first.

        Safe to call from any thread, including the task's own (from inside
        ``function``), and before ``start()``.
        """
        self.running = False
        self._cancelled.set()

    def run(self) -> None:
        """Call the function every interval until cancelled."""
        self.running = not self._cancelled.is_set()
        while not self._cancelled.wait(self.interval):
            try:
                self.function(*self.args, **self.kwargs)
            except Exception:
                self._report_failure()
        self.running = False

    def _report_failure(self) -> None:
        message = (
            f"Error in background task {self.name!r} "
            f"(function {self.function!r}); it runs again in {self.interval} s."
        )
        if self.bus is None:
            _logger.exception(message)
            return
        try:
            self.bus.log(message, level=logging.ERROR, traceback=True)
        except Exception:
            # A failing log listener must not end the task either; say it
            # where it can still be seen.
            _logger.exception(message)


class Monitor(SimplePlugin):
    """A bus plugin that runs ``callback`` every ``frequency`` seconds.

    The callback runs in a :class:`BackgroundTask` thread named ``name``
    (default: the class name) from ``start`` until ``stop``; ``graceful``
    restarts it. A frequency of 0 or less disables the monitor, as in
    CherryPy.
    """

    def __init__(
        self,
        bus: Bus,
        callback: Callable[[], Any],
        frequency: float = 60,
        name: str | None = None,
    ) -> None:
        super().__init__(bus)
        #: The function to call at intervals.
        self.callback = callback
        #: The time in seconds between calls.
        self.frequency = frequency
        #: The running :class:`BackgroundTask`, or None.
        self.thread: BackgroundTask | None = None
        self.name = name

    @property
    def _thread_name(self) -> str:
        return self.name or type(self).__name__

    def start(self) -> None:
        """Start the callback's thread unless it already runs."""
        if self.frequency <= 0:
            return
        name = self._thread_name
        if self.thread is not None and self.thread.is_alive():
            self.bus.log(f"Monitor thread {name!r} already started.")
            return
        self.thread = BackgroundTask(
            self.frequency, self.callback, bus=self.bus, name=name
        )
        self.thread.start()
        self.bus.log(f"Started monitor thread {name!r}.")

    start.priority = MONITOR_START_PRIORITY  # type: ignore[attr-defined]

    def stop(self) -> None:
        """Cancel the callback's thread and wait for a call in progress.

        Called from the monitor's own thread (the callback stopping or
        restarting the bus), it cancels without joining, since a thread
        cannot wait for itself.
        """
        thread = self.thread
        if thread is None:
            self.bus.log(f"No thread running for {self._thread_name}.")
            return
        thread.cancel()
        if thread is not threading.current_thread() and thread.ident is not None:
            thread.join()
        self.thread = None
        self.bus.log(f"Stopped thread {thread.name!r}.")

    def graceful(self) -> None:
        """Restart the callback's thread (stop, then start)."""
        self.stop()
        self.start()
