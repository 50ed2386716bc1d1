"""Turn OS signals into bus transitions, on the main thread.

A Python signal handler runs between two bytecodes of the main thread,
possibly while that thread is in the middle of a bus transition and holds
its locks. So the handler installed here only *records* the signal; the
``main`` channel, which ``Bus.block()`` ticks every ``interval`` seconds,
drains the record and calls the action (``bus.exit``, ``bus.graceful``)
as ordinary code on the main thread::

    kernel --signal--> _record(): queue.put(signum)       (any moment)
    Bus.block() --main tick--> SignalHandler.main(): drain, log, act

Tests and embedders inject a signal through the same path with
``handle(signum)``.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from busd.bus import states
from busd.plugins.base import SimplePlugin

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


class SignalHandler(SimplePlugin):
    """Map OS signals to bus actions, run from the ``main`` channel.

    ``handlers`` is a dict {signal name: callable taking no arguments};
    change it before ``subscribe()``. The defaults: SIGTERM and SIGINT exit
    the bus, SIGHUP and SIGUSR1 ask it for a graceful reload.

    ``subscribe()`` installs the OS handlers (only possible on the main
    thread) and remembers the ones it replaced; ``unsubscribe()`` and the
    ``exit`` channel put those back.
    """

    def __init__(self, bus: Bus) -> None:
        super().__init__(bus)
        self.handlers: dict[str, Callable[[], Any]] = {
            "SIGTERM": bus.exit,
            "SIGINT": bus.exit,
            "SIGHUP": bus.graceful,
            "SIGUSR1": bus.graceful,
        }
        # SimpleQueue.put is reentrant: safe to call from a signal handler
        # that interrupted another put or a get on the same queue.
        self._pending: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._previous: dict[int, _Handler] = {}
        # One bound-method object, so that "is it still ours?" is an
        # identity check against what signal.getsignal() returns.
        self._os_handler = self._record

    # -- installing and restoring the OS handlers ---------------------------

    def subscribe(self) -> None:
        """Subscribe to the bus and install the OS signal handlers.

        Python lets only the main thread install signal handlers; from any
        other thread this logs why and installs none (``handle()`` still
        works, and the bus listeners are subscribed).
        """
        super().subscribe()
        current = threading.current_thread()
        if current is not threading.main_thread():
            self.bus.log(
                f"SignalHandler: not installing signal handlers: subscribe() ran "
                f"in thread {current.name!r}, and Python allows installing "
                "signal handlers only from the main thread.",
                level=logging.WARNING,
            )
            return
        for name in self.handlers:
            signum = getattr(signal, name, None)
            if not isinstance(signum, signal.Signals):
                self.bus.log(
                    f"SignalHandler: no signal {name} on this platform; skipped.",
                    level=logging.WARNING,
                )
                continue
            previous = signal.signal(signum, self._os_handler)
            if signum not in self._previous:  # subscribe() twice keeps the first
                self._previous[signum] = previous
            self.bus.log(f"Listening for {name}.", level=logging.DEBUG)

    def unsubscribe(self) -> None:
        """Unsubscribe from the bus and restore the previous OS handlers."""
        super().unsubscribe()
        self._restore()

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
            name = signal.Signals(signum).name
            if signal.getsignal(signum) is not self._os_handler:
                self.bus.log(
                    f"SignalHandler: the {name} handler was replaced by someone "
                    "else; leaving it in place.",
                    level=logging.WARNING,
                )
                continue
            # None means "installed from C, not Python": the closest we can
            # restore is the default action.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
            self.bus.log(f"Restored the previous {name} handler.", level=logging.DEBUG)
        self._previous.clear()

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

        The action runs at the next ``main`` tick, like a real signal's.
        Safe to call from any thread and from a signal handler.
        """
        self._pending.put(int(signum))

    def main(self) -> None:
        """Drain the recorded signals and run one action for each.

        Runs on the thread that ticks ``main`` (``Bus.block()``: the main
        thread). Once the bus is EXITING, later signals are only logged.
        A failing action is logged and the next signal still gets its turn.
        """
        while True:
            try:
                signum = self._pending.get_nowait()
            except queue.Empty:
                return
            name = _signal_name(signum)
            self.bus.log(f"Caught signal {name}.")
            if self.bus.state is states.EXITING:
                self.bus.log(f"Ignoring {name}: the bus is already exiting.")
                continue
            action = self.handlers.get(name)
            if action is None:
                self.bus.log(
                    f"No action configured for {name}; ignored.",
                    level=logging.WARNING,
                )
                continue
            try:
                action()
            except Exception:
                # The bus has logged each listener failure already; one bad
                # reload must not take the whole process down.
                self.bus.log(
                    f"The action for {name} failed.",
                    level=logging.ERROR,
                    traceback=True,
                )

    def exit(self) -> None:
        """Give the signals back to their previous handlers as the bus ends."""
        self._restore()

    exit.priority = EXIT_PRIORITY  # type: ignore[attr-defined]


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
