r"""The process bus: a thread-safe drop-in for CherryPy's ``wspbus.Bus``.

A bus is a small publish/subscribe hub plus a state machine for one
process. Code subscribes callables to channels; the bus publishes on
``start``, ``stop``, ``graceful``, ``exit``, ``log`` and ``main`` as the
process moves through its life::

                       O
                       |
                       V
      STOPPING --> STOPPED --> EXITING --> X
         ^  ^         |
         |   \        |
         |    \       V
       STARTED <-- STARTING

Listeners run in priority order (lower first, default 50; subscription
order breaks ties). Every listener of a channel runs even when an earlier
one fails; the failures are raised together afterwards as
:class:`ChannelFailures`. ``KeyboardInterrupt`` and ``SystemExit`` pass
straight through, because they mean "stop the process", not "this listener
failed".

Where this differs from CherryPy on purpose (see docs/bus.md):

- subscribe/unsubscribe from any thread while another publishes is safe:
  ``publish`` walks an immutable, already-sorted tuple of the channel's
  listeners, sorted again only by the first publish after a change, so it
  neither locks nor sorts on an unchanged channel, and a (un)subscribe is
  a couple of dict operations (``bus.listeners[channel]`` is a live,
  read-only view of the channel's listeners rather than a set);
- ``subscribe`` returns the callback, so it works as a plain decorator;
- a failing ``stop`` listener no longer skips the ``exit`` listeners (the
  PID file is still removed) before the process ends with code 70;
- ``block()`` names each non-daemon thread it waits for, repeats the name
  while it waits, and gives up after ``thread_timeout`` seconds if asked;
- ``wait()`` wakes as soon as the state changes instead of polling, so
  ``block()`` then waits for the ``exit()`` in progress to finish: exit
  listeners run to the end even when ``exit()`` was called from a daemon
  thread (CherryPy's polling gives them about ``interval`` seconds);
- every state change is published on a ``state`` channel, for observers;
- a failing start listener ends the start: the start listeners after it
  do not run (CherryPy runs them all, then exits);
- ``exit()`` while already EXITING does nothing (a second SIGTERM during
  a slow exit must not run the stop and exit listeners again), and a
  failed exit logs why the process ends with status 70.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import itertools
import logging
import operator
import os
import sys
import threading
import time
import traceback as _traceback
import warnings
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet

# typing costs every worker's start a few ms; annotations don't need it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeVar, overload

    _Listener = TypeVar("_Listener", bound=Callable[..., Any])

__all__ = ["EX_SOFTWARE", "Bus", "ChannelFailures", "states"]

#: Exit status (sysexits.h) for "the bus could not shut down cleanly".
EX_SOFTWARE = 70

DEFAULT_PRIORITY = 50
DEFAULT_CHANNELS = ("start", "stop", "exit", "graceful", "log", "main")

# unsubscribe()'s "not subscribed": None could be a (bad) priority.
_ABSENT = object()
# Of a (listener, (priority, sequence)) item of a channel's dict.
_listener = operator.itemgetter(0)
_sort_key = operator.itemgetter(1)

# How often block() repeats the name of a thread it is still waiting for.
THREAD_WAIT_REMINDER_SECONDS = 10.0

# The directory the process started in: restart() returns there before
# execv so that a relative script path or ``-m`` still resolves.
_startup_cwd = os.getcwd()


class states(enum.Enum):  # lower case: the name code written for CherryPy uses
    """The states of a bus; ``repr`` reads ``states.STARTED`` as in CherryPy."""

    STOPPED = "STOPPED"
    STARTING = "STARTING"
    STARTED = "STARTED"
    STOPPING = "STOPPING"
    EXITING = "EXITING"

    def __repr__(self) -> str:
        return f"states.{self.name}"

    __str__ = __repr__


# Inside Bus, the class attribute ``states`` (CherryPy's) hides the enum's
# name, so the annotations there use this one.
_State = states


class ChannelFailures(Exception):
    """The exceptions raised by listeners during one ``Bus.publish``.

    It is truthy when it holds at least one exception; ``str()`` is the
    ``repr`` of each, one per line.
    """

    delimiter = "\n"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._exceptions: list[BaseException] = []

    def handle_exception(self) -> None:
        """Record the exception being handled right now."""
        # None only when called outside an ``except`` block; CherryPy records
        # that None too, and so must a drop-in.
        self._exceptions.append(sys.exc_info()[1])  # type: ignore[arg-type]

    def get_instances(self) -> list[BaseException]:
        """Return a copy of the recorded exceptions, in listener order."""
        return list(self._exceptions)

    def __str__(self) -> str:
        return self.delimiter.join(repr(e) for e in self._exceptions)

    __repr__ = __str__

    def __bool__(self) -> bool:
        return bool(self._exceptions)


def _flush_logs_and_stdio() -> None:
    """Flush what we can before ``os._exit`` throws buffers away."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()


class Bus:
    """A process's state machine and message hub.

    All listeners of a channel are called even if some fail; each failure
    is logged on the ``log`` channel and they are raised together as
    :class:`ChannelFailures`. The only way for a listener to stop the
    processing is to raise ``SystemExit`` (or ``KeyboardInterrupt``).
    """

    states = states
    state = states.STOPPED
    execv = False
    #: Seconds ``block()`` waits for lingering non-daemon threads; None waits
    #: as long as they take (CherryPy's behaviour).
    thread_timeout: float | None = None

    def __init__(self) -> None:
        self.execv = False
        self.state = states.STOPPED
        # One record of the subscriptions: ``_priority[channel]`` maps each
        # listener to its sort key, its priority then a sequence number
        # (equal priorities run in subscription order). ``listeners`` mirrors
        # CherryPy's public dict of sets with live read-only views of those
        # dicts' keys, so the two never disagree. Dispatch reads ``_ordered``:
        # per channel, an immutable tuple of its listeners already sorted, or
        # None once a (un)subscribe changed the channel; the next publish
        # sorts it again (see _sort). So a (un)subscribe is two or three dict
        # operations, each atomic, with no lock; a publish on an unchanged
        # channel neither locks nor sorts, and never sees a half-made list.
        self._priority: dict[str, dict[Callable[..., Any], tuple[int, int]]] = {
            channel: {} for channel in DEFAULT_CHANNELS
        }
        self._sequence = itertools.count()
        self.listeners: dict[str, AbstractSet[Callable[..., Any]]] = {
            channel: priorities.keys() for channel, priorities in self._priority.items()
        }
        # Keyed by channel names; publish(None) (wait() with no channel) looks
        # None up and finds nothing, as in CherryPy.
        self._ordered: dict[str | None, tuple[Callable[..., Any], ...] | None] = {}
        # Re-entrant: a signal handler that changes state may interrupt the
        # main thread while it holds this lock inside wait().
        self._state_changed = threading.Condition(threading.RLock())
        # Set by wake(): wait() publishes its channel now, not at the next tick.
        self._woken = False
        # Set while no exit() is running; block() waits on it.
        self._exit_finished = threading.Event()
        self._exit_finished.set()
        self._atexit_registered = False

    # -- subscriptions -----------------------------------------------------

    if TYPE_CHECKING:

        @overload
        def subscribe(
            self, channel: str, callback: _Listener, priority: int | None = None
        ) -> _Listener: ...

        @overload
        def subscribe(
            self, channel: str, callback: None = None, priority: int | None = None
        ) -> Callable[[_Listener], _Listener]: ...

    def subscribe(
        self,
        channel: str,
        callback: Callable[..., Any] | None = None,
        priority: int | None = None,
    ) -> Any:
        """Call ``callback`` on every publish to ``channel``; return it.

        Without a callback, return a decorator that subscribes the function
        it decorates. The priority comes from the argument, else from the
        callback's ``priority`` attribute, else 50; lower runs first.
        Subscribing a callback again only changes its priority.
        """
        if callback is None:

            def decorator(func: _Listener) -> _Listener:
                return self.subscribe(channel, func, priority)

            return decorator

        if priority is None:
            priority = getattr(callback, "priority", DEFAULT_PRIORITY)
        priorities = self._priority.get(channel)
        if priorities is None:
            priorities = self._priority.setdefault(channel, {})
            # Replaces an empty set that CherryPy-style code may have put
            # there to declare the channel.
            self.listeners[channel] = priorities.keys()
        # One assignment: a publish sorting meanwhile sees the listener
        # either before or after the change, never missing. A new sequence
        # number puts a re-subscribed listener behind its equals.
        priorities[callback] = (priority, next(self._sequence))
        # After the change, never before: see _sort.
        self._ordered[channel] = None
        return callback

    def unsubscribe(self, channel: str, callback: Callable[..., Any]) -> None:
        """Stop calling ``callback`` on ``channel`` (no error if it was not)."""
        priorities = self._priority.get(channel)
        if priorities is not None and priorities.pop(callback, _ABSENT) is not _ABSENT:
            self._ordered[channel] = None

    def _sort(self, channel: str | None) -> tuple[Callable[..., Any], ...]:
        """Sort ``channel``'s listeners for dispatch, after a (un)subscribe.

        Priority first, then subscription order. Nothing here or in
        (un)subscribe takes a lock: they change the channel's dict, then
        mark the channel unsorted. A change made while this sorts a copy
        would be lost when the stale tuple is stored over its mark, so the
        copy is compared with the dict again *after* storing: a change
        before that comparison is seen and sorted again; a change after it
        marks the channel unsorted after the store. Two threads sorting at
        once both end on a tuple checked after they stored it.
        """
        priorities = self._priority.get(channel, {})  # type: ignore[arg-type]
        while True:
            # list() of a dict's items runs no Python code: a consistent copy.
            items = list(priorities.items())
            ordered = tuple(map(_listener, sorted(items, key=_sort_key)))
            self._ordered[channel] = ordered
            if list(priorities.items()) == items:
                return ordered

    # -- publishing --------------------------------------------------------

    def publish(self, channel: str | None, *args: Any, **kwargs: Any) -> list[Any]:
        """Call every listener of ``channel`` in order; return their results.

        Listener exceptions are logged and raised together afterwards as
        :class:`ChannelFailures`. A channel nobody subscribed to returns [].
        """
        callbacks = self._ordered.get(channel, ())
        if not callbacks:
            if callbacks is None:  # changed since the last publish
                callbacks = self._sort(channel)
            if not callbacks:
                return []
        output = []
        failures: ChannelFailures | None = None
        for callback in callbacks:
            try:
                output.append(callback(*args, **kwargs))
            except KeyboardInterrupt:
                raise
            except SystemExit as exit_request:
                # A clean exit requested after other listeners failed must
                # not report success.
                if failures and exit_request.code == 0:
                    exit_request.code = 1
                raise
            except Exception:
                if failures is None:
                    failures = ChannelFailures()
                failures.handle_exception()
                # A failing log listener would make logging the failure fail
                # again, and so on.
                if channel != "log":
                    self.log(
                        f"Error in {channel!r} listener {callback!r}",
                        level=logging.ERROR,
                        traceback=True,
                    )
                # While starting, the first failure ends the start: no later
                # start listener may act (bind, report ready) for a process
                # that is about to exit.
                if channel == "start" and self.state is states.STARTING:
                    raise failures from None
        if failures:
            raise failures
        return output

    # -- state machine -----------------------------------------------------

    def _change_state(self, state: _State) -> None:
        """Move to ``state`` and wake whoever waits in ``wait()``.

        The only place that assigns ``self.state`` after construction; it
        publishes the new state on the ``state`` channel (a busd addition).
        """
        with self._state_changed:
            self.state = state
            self._state_changed.notify_all()
        # Observers (busd's event stream) learn of every change. The channel
        # exists only once someone subscribes, and its failures are logged
        # by publish() but never stop a transition.
        if "state" in self._ordered:
            with contextlib.suppress(ChannelFailures):
                self.publish("state", state)

    def start(self) -> None:
        """Start all services: publish ``start``, then be STARTED.

        If a start listener fails, the start listeners after it do not run
        (a daemon must not bind its socket or tell systemd it is ready once
        its PID file was refused); the error is logged, the bus exits (stop
        and exit listeners run) and, as in CherryPy, the process ends with
        status 70 because it never finished starting.
        """
        if not self._atexit_registered:
            atexit.register(self._clean_exit)
            self._atexit_registered = True
        self._change_state(states.STARTING)
        self.log("Bus STARTING")
        try:
            self.publish("start")
            self._change_state(states.STARTED)
            self.log("Bus STARTED")
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:
            self.log(
                "Shutting down due to error in start listener:",
                level=logging.ERROR,
                traceback=True,
            )
            with contextlib.suppress(Exception):  # logged by the listeners' bus
                self.exit()
            raise error

    def stop(self) -> None:
        """Stop all services: publish ``stop``, then be STOPPED."""
        self._change_state(states.STOPPING)
        self.log("Bus STOPPING")
        self.publish("stop")
        self._change_state(states.STOPPED)
        self.log("Bus STOPPED")

    def graceful(self) -> None:
        """Ask all services to reload (publish ``graceful``)."""
        self.log("Bus graceful")
        self.publish("graceful")

    def exit(self) -> None:
        """Stop all services and prepare the process to end.

        Exit listeners run even when a stop listener failed. If anything
        failed, or if the bus was still STARTING, the process ends at once
        with status 70 (EX_SOFTWARE), as in CherryPy.
        """
        exit_from = self.state
        if exit_from is states.EXITING:
            return  # a second signal while exiting: the first one is enough
        self._exit_finished.clear()
        try:
            failed = False
            try:
                self.stop()
            except Exception:
                failed = True  # logged by publish(); the exit listeners still run
            try:
                self._change_state(states.EXITING)
                self.log("Bus EXITING")
                self.publish("exit")
            except Exception:
                failed = True
            if failed:
                self.log(
                    f"Bus exit failed: ending the process with status {EX_SOFTWARE}",
                    level=logging.ERROR,
                )
                _flush_logs_and_stdio()
                os._exit(EX_SOFTWARE)
            self.log("Bus EXITED")
            if exit_from is states.STARTING:
                # exit() during start (a start listener failed or hung and the
                # user pressed Ctrl-C): ending now avoids a Ctrl-C loop.
                _flush_logs_and_stdio()
                os._exit(EX_SOFTWARE)
        finally:
            self._exit_finished.set()

    def restart(self) -> None:
        """Exit the bus and have the main thread re-execute the process.

        The execv itself happens in ``block()`` on the main thread.
        """
        self.execv = True
        self.exit()

    def _clean_exit(self) -> None:
        """At interpreter exit, shut down a bus that is still running."""
        if self.state is not states.EXITING:
            warnings.warn(
                f"The main thread is exiting, but the Bus is in the {self.state!r} "
                "state; shutting it down automatically now. Call bus.block() "
                "after start(), or bus.exit() before the main thread exits.",
                RuntimeWarning,
                stacklevel=1,
            )
            self.exit()

    # -- waiting -----------------------------------------------------------

    def wait(
        self,
        state: _State | Iterable[_State],
        interval: float = 0.1,
        channel: str | None = None,
    ) -> None:
        """Block until the bus is in ``state`` (one state or several).

        Every ``interval`` seconds spent waiting, publish on ``channel``
        (``block()`` uses this to tick ``main``). Returns as soon as the
        state is reached rather than at the next tick.
        """
        wanted = {state} if isinstance(state, states) else set(state)
        while True:
            with self._state_changed:
                self._state_changed.wait_for(
                    lambda: self.state in wanted or self._woken, timeout=interval
                )
                if self.state in wanted:
                    return
                self._woken = False
            self.publish(channel)

    def wake(self) -> None:
        """Have ``wait()`` (and so ``block()``) publish its channel now.

        A signal handler calls this so that the ``main`` tick acting on the
        signal comes at once, not up to ``interval`` later. It never blocks,
        so it is safe in a signal handler: when another thread holds the
        bus's state lock at that moment, the tick simply comes on time.
        """
        self._woken = True
        if self._state_changed.acquire(blocking=False):
            try:
                self._state_changed.notify_all()
            finally:
                self._state_changed.release()

    def block(self, interval: float = 0.1, thread_timeout: float | None = None) -> None:
        """Tick ``main`` until EXITING, then wait for non-daemon threads.

        Call it from the main thread after ``start()``. Ctrl-C
        (KeyboardInterrupt) exits the bus. Each non-daemon thread still
        alive is named in the log while we wait for it; with
        ``thread_timeout`` (or the class attribute of that name) set, the
        wait gives up after that many seconds, logs the threads left, and
        ends the process with status 70 so that ``exit`` keeps its promise.
        Finally, if ``restart()`` was called, re-execute the process.
        """
        try:
            self.wait(states.EXITING, interval=interval, channel="main")
        except (KeyboardInterrupt, OSError):
            self.log("Keyboard Interrupt: shutting down bus")
            self.exit()
        except SystemExit:
            self.log("SystemExit raised: shutting down bus")
            self.exit()
            raise

        # wait() returns as soon as the state is EXITING, while the thread
        # that called exit() may still be running the exit listeners.
        if thread_timeout is None:
            thread_timeout = self.thread_timeout
        if not self._exit_finished.wait(thread_timeout):
            self._abandon_threads(thread_timeout)
        self._join_threads(thread_timeout)
        if self.execv:
            self._do_execv()

    def _join_threads(self, timeout: float | None) -> None:
        self.log("Waiting for child threads to terminate...")
        deadline = None if timeout is None else time.monotonic() + timeout
        current = threading.current_thread()
        for thread in threading.enumerate():
            if thread is current or thread is threading.main_thread():
                continue
            if thread.daemon:
                continue
            self.log(f"Waiting for thread {thread.name}.")
            waited = 0.0
            while thread.is_alive():
                step = THREAD_WAIT_REMINDER_SECONDS
                if deadline is not None:
                    step = min(step, max(0.0, deadline - time.monotonic()))
                thread.join(step)
                waited += step
                if not thread.is_alive():
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    self._abandon_threads(timeout)
                    return
                self.log(
                    f"Still waiting for thread {thread.name} after {waited:.0f} s.",
                    level=logging.WARNING,
                )

    def _abandon_threads(self, timeout: float | None) -> None:
        left = [
            t.name
            for t in threading.enumerate()
            if t.is_alive() and not t.daemon and t is not threading.current_thread()
        ]
        self.log(
            f"Threads still running after {timeout} s: {', '.join(left)}; "
            f"ending the process with status {EX_SOFTWARE}",
            level=logging.ERROR,
        )
        _flush_logs_and_stdio()
        os._exit(EX_SOFTWARE)

    def _do_execv(self) -> None:
        """Replace this process with a fresh run of the same command line."""
        args = list(sys.orig_argv)
        self.log(f"Re-spawning {' '.join(args)}")
        os.chdir(_startup_cwd)
        # Descriptors opened by Python are non-inheritable already (PEP 446),
        # so nothing leaks into the new image.
        os.execv(sys.executable, args)

    def start_with_callback(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> threading.Thread:
        """Start ``func`` in a new thread once the bus is STARTED; start the bus.

        Return the thread.
        """
        args = args or ()
        kwargs = kwargs or {}

        def _callback() -> None:
            self.wait(states.STARTED)
            func(*args, **kwargs)

        thread = threading.Thread(target=_callback)
        thread.name = "Bus Callback " + thread.name
        thread.start()
        self.start()
        return thread

    # -- logging -----------------------------------------------------------

    def log(
        self, msg: str = "", level: int = logging.INFO, traceback: bool = False
    ) -> None:
        """Publish ``msg`` on the ``log`` channel at ``level``.

        With ``traceback=True`` the exception being handled is appended.
        """
        if traceback:
            msg += "\n" + "".join(_traceback.format_exception(*sys.exc_info()))
        self.publish("log", msg, level)
