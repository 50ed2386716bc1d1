"""Turn OS signals into bus channels, published on the main thread.

The API is CherryPy's ``SignalHandler``: ``handlers`` maps signal names to
callables, ``subscribe()`` makes each callable a listener of the bus
channel named after its signal (``"SIGTERM"``, ...) and installs an OS
handler for that signal, and a signal that arrives publishes its channel.
The defaults are CherryPy's too: SIGTERM exits the bus, SIGUSR1 asks for a
graceful reload, SIGHUP exits when a terminal hung up and restarts the
process (``bus.restart()``: a re-exec) when it was daemonized. SIGINT is
left to Python: a ``KeyboardInterrupt`` that ``Bus.block()`` turns into an
exit. A program that wants other actions configures them::

    handler = SignalHandler(bus)
    handler.handlers["SIGHUP"] = bus.graceful      # before subscribe()
    handler.set_handler("SIGUSR2", rotate_logs)    # or at any time
    handler.subscribe()

One thing differs on purpose. A Python signal handler runs between two
bytecodes of the main thread, possibly while that thread is in the middle
of a bus transition and holds its locks. So the OS handler installed here
only *records* the signal and wakes the bus; the ``main`` channel, which
``Bus.block()`` ticks, drains the record and publishes the signal's channel
as ordinary code on the main thread::

    kernel --signal--> _record(): queue.put(signum), bus.wake()  (any moment)
    Bus.block() --main tick--> SignalHandler.main(): publish("SIGTERM")

Tests and embedders inject a signal through the same path with
``handle(signum)``.
"""

from __future__ import annotations

import logging
import os
import queue
import signal as _signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any, ClassVar

from busd.bus import states

if TYPE_CHECKING:
    from busd.bus import Bus

__all__ = ["SignalHandler"]

# Restore the previous handlers only after every other exit listener ran: a
# second SIGTERM or Ctrl-C during stop/exit is then still just recorded
# (harmless), while one that arrives later, when block() waits for lingering
# threads and nothing drains the queue any more, gets the old behaviour back
# (for SIGINT: KeyboardInterrupt) instead of being swallowed.
EXIT_PRIORITY = 95

_Handler = Callable[[int, FrameType | None], Any] | int | None


class SignalHandler:
    """Publish a bus channel named after each OS signal that arrives.

    ``handlers`` is a dict {signal name: listener taking no arguments};
    ``subscribe()`` calls ``set_handler(name, listener)`` for each, so change
    it before then. The defaults: SIGTERM → ``bus.exit``, SIGHUP →
    ``handle_SIGHUP`` (exit, or restart when daemonized), SIGUSR1 →
    ``bus.graceful``. ``signals`` maps each signal number to its name.

    Any code may listen to a signal's channel: ``bus.subscribe("SIGUSR2",
    f)`` and ``set_handler("SIGUSR2")`` get ``f`` called on SIGUSR2. The
    channel is published by the ``main`` tick on the main thread, never
    from inside the OS handler. ``unsubscribe()`` and the ``exit`` channel
    put the previous OS handlers back.
    """

    #: Signal number → name, for every signal of this platform.
    signals: ClassVar[dict[int, str]] = {sig: sig.name for sig in _signal.Signals}

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.handlers: dict[str, Callable[[], Any]] = {
            "SIGTERM": bus.exit,
            "SIGHUP": self.handle_SIGHUP,
            "SIGUSR1": bus.graceful,
        }
        # handle_SIGHUP() calls the process daemonized only once it forked
        # away from the PID it had here.
        self._original_pid = os.getpid()
        # SimpleQueue.put is reentrant: safe to call from a signal handler
        # that interrupted another put or a get on the same queue.
        self._pending: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._previous: dict[int, _Handler] = {}
        # One bound-method object, so that "is it still ours?" is an
        # identity check against what signal.getsignal() returns.
        self._os_handler = self._record

    # -- installing and restoring the OS handlers ---------------------------

    def subscribe(self) -> None:
        """Listen for every signal in ``handlers``, each with its listener.

        Python lets only the main thread install signal handlers; from any
        other thread this logs why and installs none, but still subscribes
        the listeners (``handle()`` then works). A name this platform has no
        signal for is logged and skipped.
        """
        self._attach()
        current = threading.current_thread()
        on_main_thread = current is threading.main_thread()
        if not on_main_thread:
            self.bus.log(
                f"SignalHandler: not installing signal handlers: subscribe() ran "
                f"in thread {current.name!r}, and Python allows installing "
                "signal handlers only from the main thread.",
                level=logging.WARNING,
            )
        for name, listener in self.handlers.items():
            if name not in _signal.Signals.__members__:
                self.bus.log(
                    f"SignalHandler: no signal {name} on this platform; skipped.",
                    level=logging.WARNING,
                )
                continue
            if on_main_thread:
                self.set_handler(name, listener)
            else:
                self.bus.subscribe(self._channel(_signal.Signals[name]), listener)

    def unsubscribe(self) -> None:
        """Stop acting on signals and restore the previous OS handlers.

        The listeners stay subscribed to the signals' channels (as in
        CherryPy): a later ``subscribe()`` or a publish by hand reaches them.
        """
        self.bus.unsubscribe("main", self.main)
        self.bus.unsubscribe("exit", self.exit)
        self._restore()

    def set_handler(
        self, signal: str | int, listener: Callable[..., Any] | None = None
    ) -> None:
        """Install the OS handler for ``signal`` (a name or a number).

        With a ``listener``, subscribe it to the signal's channel too.
        Raise ValueError for a signal this platform does not have, and (as
        ``signal.signal`` does) when called off the main thread.
        """
        signum = self._resolve(signal)
        self._attach()
        previous = _signal.signal(signum, self._os_handler)
        if signum not in self._previous:  # set twice: keep the first
            self._previous[signum] = previous
        channel = self._channel(signum)
        self.bus.log(f"Listening for {channel}.", level=logging.DEBUG)
        if listener is not None:
            self.bus.subscribe(channel, listener)

    def _resolve(self, signal: str | int) -> _signal.Signals:
        """The signal a name (aliases too) or a number stands for."""
        try:
            if isinstance(signal, str):
                return _signal.Signals[signal]
            return _signal.Signals(signal)
        except (KeyError, ValueError):
            raise ValueError(f"No such signal: {signal!r}") from None

    def _channel(self, signum: int) -> str:
        """The channel published for ``signum``: its name in ``signals``."""
        name = self.signals.get(signum)
        return name if name is not None else _signal_name(signum)

    def _attach(self) -> None:
        """Subscribe the tick that acts and the exit that restores (idempotent)."""
        self.bus.subscribe("main", self.main)
        self.bus.subscribe("exit", self.exit, priority=EXIT_PRIORITY)

    def _restore(self) -> None:
        """Put back the handlers we replaced, where ours is still installed."""
        if not self._previous:
            return
        current = threading.current_thread()
        if current is not threading.main_thread():
            # bus.exit() may run on a control thread; failing here would turn
            # a clean exit into status 70.
            self.bus.log(
                f"SignalHandler: cannot restore signal handlers from thread "
                f"{current.name!r} (only the main thread may); leaving ours.",
                level=logging.WARNING,
            )
            return
        for signum, previous in self._previous.items():
            name = _signal_name(signum)
            if _signal.getsignal(signum) is not self._os_handler:
                self.bus.log(
                    f"SignalHandler: the {name} handler was replaced by someone "
                    "else; leaving it in place.",
                    level=logging.WARNING,
                )
                continue
            # None means "installed from C, not Python": the closest we can
            # restore is the default action.
            _signal.signal(signum, _signal.SIG_DFL if previous is None else previous)
            self.bus.log(f"Restored the previous {name} handler.", level=logging.DEBUG)
        self._previous.clear()

    # -- the SIGHUP default --------------------------------------------------

    def handle_SIGHUP(self) -> None:
        """Restart the process if it is daemonized, else exit the bus.

        A terminal that closes sends SIGHUP to what runs in it: that
        process should end. A daemon has no terminal, and SIGHUP is the
        conventional "start afresh" request: ``bus.restart()`` re-executes
        it once the bus has exited.
        """
        if self._is_daemonized():
            self.bus.log("SIGHUP while daemonized: restarting the process.")
            self.bus.restart()
        else:
            self.bus.log("SIGHUP while not daemonized: exiting.")
            self.bus.exit()

    def _is_daemonized(self) -> bool:
        """Whether the process forked away since this plugin was made and
        has no terminal on stdin.

        The fork matters as much as the terminal: a process run by a CI
        system or a service manager has no terminal either, but it was not
        daemonized, and SIGHUP should end it.
        """
        if os.getpid() == self._original_pid:
            return False
        try:
            return not os.isatty(sys.stdin.fileno())
        except (AttributeError, ValueError, OSError):  # no stdin, or closed
            return True

    # -- recording and acting -----------------------------------------------

    def _record(self, signum: int, frame: FrameType | None) -> None:
        """The OS signal handler: note the signal and wake the main tick."""
        self._pending.put(signum)
        wake = getattr(self.bus, "wake", None)  # a CherryPy bus has none
        if wake is not None:
            wake()

    @property
    def pending(self) -> int:
        """How many signals are recorded and still wait for a ``main`` tick."""
        return self._pending.qsize()

    def handle(self, signum: int) -> None:
        """Record ``signum`` as if the OS had delivered it.

        Its channel is published at the next ``main`` tick, like a real
        signal's. Safe to call from any thread and from a signal handler.
        """
        self._pending.put(int(signum))

    def main(self) -> None:
        """Drain the recorded signals and publish each one's channel.

        Runs on the thread that ticks ``main`` (``Bus.block()``: the main
        thread). Once the bus is EXITING, later signals are only logged.
        A failing listener is logged and the next signal still gets its turn.
        """
        while True:
            try:
                signum = self._pending.get_nowait()
            except queue.Empty:
                return
            channel = self._channel(signum)
            self.bus.log(f"Caught signal {channel}.")
            if self.bus.state is states.EXITING:
                self.bus.log(f"Ignoring {channel}: the bus is already exiting.")
                continue
            if not self.bus.listeners.get(channel):
                self.bus.log(
                    f"No action configured for {channel}; ignored.",
                    level=logging.WARNING,
                )
                continue
            try:
                self.bus.publish(channel)
            except Exception:
                # publish() logged each failing listener with its traceback;
                # one bad reload must not take the whole process down.
                self.bus.log(f"The action for {channel} failed.", level=logging.ERROR)

    def exit(self) -> None:
        """Give the signals back to their previous handlers as the bus ends."""
        self._restore()


def _signal_name(signum: int) -> str:
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
