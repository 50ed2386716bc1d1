"""Periodic work: repeating background threads and a bus plugin that runs one.

:class:`BackgroundTask` is a daemon thread that calls a function every
``interval`` seconds until :meth:`~BackgroundTask.cancel` is called;
:class:`PerpetualTimer` is the same loop as a :class:`threading.Timer`.
:class:`Monitor` ties a task to the bus: it starts with the bus, stops with
it and restarts on ``graceful``.

They keep the names, arguments, attributes, log lines and error handling of
CherryPy's classes of the same names (``interval``, ``function``, ``args``,
``kwargs``, ``bus``, ``running``; ``callback``, ``frequency``, ``thread``,
``name``), so code written for CherryPy works unchanged. In particular a
function that raises is logged on the bus (``Error in background task thread
function <f>.``, level 40, with traceback) and ends its task, as in CherryPy.
``keep_running=True`` (keyword-only, busd's) logs the error and carries on at
the next interval instead, for work where a transient failure (a full disk,
a lost connection) must not silently turn the task off for good.

Deliberate differences (docs/bus.md): the tasks wait on a
:class:`threading.Event`, so ``cancel()`` ends the wait at once instead of
after the current ``time.sleep(interval)`` (and a task cancelled before it
starts makes no call); ``Monitor.stop()`` waits for a call in progress and
cancels the task even when called from the task's own thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from busd.plugins.base import SimplePlugin

if TYPE_CHECKING:
    from busd.bus import Bus

__all__ = ["MONITOR_START_PRIORITY", "BackgroundTask", "Monitor", "PerpetualTimer"]

# CherryPy's value, kept so that mixed plugin sets order the same way: the
# monitor starts after the ordinary services (50) it usually watches, and
# after a Daemonizer (65) so that its thread lives in the final process.
MONITOR_START_PRIORITY = 70

_logger = logging.getLogger(__name__)


def _report_failure(
    bus: Bus | None, what: str, function: Callable[..., Any], keep_running: bool
) -> None:
    """Log a failed call of a task's function on ``bus``, as CherryPy words it.

    Without a bus, CherryPy logs nothing (the thread's exception is printed
    by :func:`threading.excepthook` as it ends); a task that keeps running
    logs on this module's logger instead, since nothing else would say it.
    """
    message = f"Error in {what} thread function {function!r}."
    if bus is None:
        if keep_running:
            _logger.exception(message)
        return
    try:
        bus.log(message, level=logging.ERROR, traceback=True)
    except Exception:
        # A failing log listener must not hide the failure.
        _logger.exception(message)


class BackgroundTask(threading.Thread):
    """A daemon thread that calls ``function`` every ``interval`` seconds.

    The first call happens one interval after ``start()``; the next
    interval is counted from the end of the previous call, so slow calls
    never pile up. ``cancel()`` takes effect immediately when the thread is
    waiting, and right after the current call when it is running one.

    An exception from ``function`` is logged on ``bus`` (level 40, with the
    traceback) and re-raised: the thread ends, as CherryPy's does. With
    ``keep_running=True`` the task logs it (on this module's logger when
    there is no bus) and carries on.
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
        keep_running: bool = False,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.interval = interval
        self.function = function
        self.args = args
        self.kwargs = {} if kwargs is None else kwargs
        self.bus = bus
        #: Log a failing call and go on (True), or end the thread (False).
        self.keep_running = keep_running
        #: True from the moment the thread runs until it ends or is cancelled.
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
        """Call the function every interval until cancelled (or it fails)."""
        self.running = not self._cancelled.is_set()
        try:
            while not self._cancelled.wait(self.interval):
                try:
                    self.function(*self.args, **self.kwargs)
                except Exception:
                    _report_failure(
                        self.bus, "background task", self.function, self.keep_running
                    )
                    if not self.keep_running:
                        raise
        finally:
            self.running = False


class PerpetualTimer(threading.Timer):
    """A :class:`threading.Timer` that repeats: ``function`` every ``interval``.

    Takes Timer's arguments plus ``bus`` (and busd's keyword-only
    ``keep_running``); ``cancel()`` is Timer's, and ends the wait at once.
    Unlike :class:`BackgroundTask` it is not a daemon thread unless made
    one. A failing call is logged on ``bus`` (``Error in perpetual timer
    thread function <f>.``, level 40, with traceback) and ends the thread,
    as in CherryPy, unless ``keep_running`` is true.
    """

    def __init__(
        self,
        interval: float,
        function: Callable[..., Any],
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        bus: Bus | None = None,
        keep_running: bool = False,
    ) -> None:
        super().__init__(interval, function, args, kwargs)
        self.bus = bus
        #: Log a failing call and go on (True), or end the thread (False).
        self.keep_running = keep_running

    def run(self) -> None:
        """Call the function every interval until cancelled (or it fails)."""
        while not self.finished.wait(self.interval):
            try:
                self.function(*self.args, **self.kwargs)
            except Exception:
                _report_failure(
                    self.bus, "perpetual timer", self.function, self.keep_running
                )
                if not self.keep_running:
                    raise


class Monitor(SimplePlugin):
    """A bus plugin that runs ``callback`` every ``frequency`` seconds.

    The callback runs in a :class:`BackgroundTask` thread named ``name``
    (default: the class name) from ``start`` until ``stop``; ``graceful``
    restarts it. A frequency of 0 or less disables the monitor, as in
    CherryPy. A callback that raises is logged and ends the thread, as in
    CherryPy, until the next ``start`` or ``graceful``; ``keep_running=True``
    (busd's) keeps calling it.
    """

    def __init__(
        self,
        bus: Bus,
        callback: Callable[[], Any],
        frequency: float = 60,
        name: str | None = None,
        *,
        keep_running: bool = False,
    ) -> None:
        super().__init__(bus)
        #: The function to call at intervals.
        self.callback = callback
        #: The time in seconds between calls.
        self.frequency = frequency
        #: The running :class:`BackgroundTask`, or None.
        self.thread: BackgroundTask | None = None
        self.name = name
        #: Passed to the :class:`BackgroundTask`: go on after a failing call.
        self.keep_running = keep_running

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
            self.frequency,
            self.callback,
            bus=self.bus,
            name=name,
            keep_running=self.keep_running,
        )
        self.thread.start()
        self.bus.log(f"Started monitor thread {name!r}.")

    start.priority = MONITOR_START_PRIORITY  # type: ignore[attr-defined]

    def stop(self) -> None:
        """Cancel the callback's thread and wait for a call in progress.

        Called from the monitor's own thread (the callback stopping or
        restarting the bus), it cancels without joining, since a thread
        cannot wait for itself, and without a log line, as CherryPy.
        """
        thread = self.thread
        if thread is None:
            self.bus.log(f"No thread running for {self._thread_name}.")
            return
        thread.cancel()
        self.thread = None
        if thread is threading.current_thread():
            # The callback stops its own monitor (the Autoreloader restarting
            # the bus): it has said so already; CherryPy logs nothing here.
            return
        if thread.ident is not None:
            thread.join()
        self.bus.log(f"Stopped thread {thread.name!r}.")

    def graceful(self) -> None:
        """Restart the callback's thread (stop, then start)."""
        self.stop()
        self.start()
