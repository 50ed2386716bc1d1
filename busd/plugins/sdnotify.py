"""Tell systemd how the process is doing: the sd_notify protocol on the bus.

A service of ``Type=notify`` finds the address of systemd's notification
socket in ``$NOTIFY_SOCKET`` (a path, or ``@name`` for a socket in the
abstract namespace) and sends it datagrams of newline-separated
``KEY=value`` lines: ``READY=1`` once started, ``RELOADING=1`` and
``READY=1`` around a reload, ``STOPPING=1`` when going down, ``STATUS=...``
for ``systemctl status``, and ``WATCHDOG=1`` at least every
``$WATCHDOG_USEC`` microseconds when the unit has ``WatchdogSec=``.

:func:`notify` sends one message. :class:`SdNotify` is a bus plugin that
sends the right messages at the right points of the bus's life::

    graceful: RELOADING=1 (priority 5) ... listeners ... READY=1 (95)
    start:    ... every other listener ...  READY=1, MAINPID (90), watchdog on
    stop:     watchdog off, STOPPING=1 (5) ... every other listener ...

Without ``$NOTIFY_SOCKET`` (not started by systemd) everything here is a
no-op. The protocol is a few lines of socket code, so no libsystemd
binding is needed.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING

from busd.plugins.base import SimplePlugin
from busd.plugins.tasks import BackgroundTask

if TYPE_CHECKING:
    from busd.bus import Bus

__all__ = [
    "NOTIFY_ENVIRONMENT",
    "RELOADED_PRIORITY",
    "RELOADING_PRIORITY",
    "START_PRIORITY",
    "STOP_PRIORITY",
    "SdNotify",
    "monotonic_usec",
    "notify",
    "unset_environment",
]

#: The variables through which systemd addresses its main process.
NOTIFY_ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

# READY=1 means "serving": send it after every other start listener (PID
# file, control socket, privilege drop at 77, daemonizing at 65, monitors
# at 70, brokers at 50) has run, so systemd starts dependent units only
# once busd really answers.
START_PRIORITY = 90
# RELOADING=1 before any graceful listener begins reloading, and READY=1
# after all of them finished: systemd's reload job spans exactly the work.
RELOADING_PRIORITY = 5
RELOADED_PRIORITY = 95
# STOPPING=1 first, so that systemd shows "deactivating" for the whole
# shutdown rather than only after the slow listeners are done.
STOP_PRIORITY = 5


def monotonic_usec() -> int:
    """Return CLOCK_MONOTONIC in microseconds, as ``MONOTONIC_USEC`` wants."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _socket_address(value: str) -> str:
    """Turn a ``$NOTIFY_SOCKET`` value into an AF_UNIX address."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # sd_notify(3) refuses relative paths too: they would depend on the cwd.
    raise OSError(errno.EAFNOSUPPORT, f"Unsupported NOTIFY_SOCKET address {value!r}")


def _send(address: str, lines: tuple[str, ...]) -> None:
    """Send one datagram of ``lines`` to the notification socket ``address``."""
    message = "\n".join(lines).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendto(message, _socket_address(address))


def notify(*lines: str) -> bool:
    """Send ``lines`` (e.g. ``"READY=1"``, ``"STATUS=..."``) as one message.

    Return False, doing nothing, when ``$NOTIFY_SOCKET`` is unset, and True
    when the message was sent. Like ``sd_notify(3)`` and python-systemd, a
    failure to send (the socket is gone) raises :class:`OSError`.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    _send(address, lines)
    return True


def unset_environment() -> None:
    """Remove ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

    Child processes inherit the environment; without this a broker written
    against sd_notify would tell systemd it is ready, or stopping, as if it
    were the main process. :class:`SdNotify` reads the variables when it is
    created, so it keeps working after they are removed.
    """
    for name in NOTIFY_ENVIRONMENT:
        os.environ.pop(name, None)


# SdNotify's keyword argument of the same name hides the function there.
_unset_environment = unset_environment


class SdNotify(SimplePlugin):
    """A bus plugin that keeps systemd informed (``Type=notify`` units).

    It reads ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID``
    when created; with ``unset_environment=True`` it then removes them so
    that child processes don't inherit them (see :func:`unset_environment`).

    When the watchdog is enabled for this process (``WATCHDOG_USEC`` set and
    ``WATCHDOG_PID`` unset or our PID), a :class:`BackgroundTask` sends
    ``WATCHDOG=1`` every half period from ``READY`` until ``stop``/``exit``.

    Failing to send (the socket is gone, systemd restarted) never raises
    into the bus: the first failure is logged at WARNING and the following
    ones are silent until a message gets through again.
    """

    #: The STATUS= text sent with READY=1 after start and after a reload.
    ready_status = "Running"
    #: The STATUS= text sent with RELOADING=1.
    reloading_status = "Reloading"
    #: The STATUS= text sent with STOPPING=1.
    stopping_status = "Stopping"

    def __init__(self, bus: Bus, *, unset_environment: bool = False) -> None:
        super().__init__(bus)
        #: The ``$NOTIFY_SOCKET`` value read at creation; None when unset.
        self.socket_address: str | None = os.environ.get("NOTIFY_SOCKET") or None
        self._watchdog_usec = os.environ.get("WATCHDOG_USEC")
        self._watchdog_pid = os.environ.get("WATCHDOG_PID")
        #: The task sending WATCHDOG=1 while the bus runs, else None.
        self.watchdog: BackgroundTask | None = None
        self._failing = False
        self._failing_lock = threading.Lock()
        self._watchdog_lock = threading.Lock()
        if unset_environment:
            _unset_environment()

    @property
    def enabled(self) -> bool:
        """Whether systemd listens (``$NOTIFY_SOCKET`` was set)."""
        return self.socket_address is not None

    # -- sending ---------------------------------------------------------

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` as one message; return whether it was sent.

        Never raises: see the class docstring for how failures are logged.
        """
        if self.socket_address is None:
            return False
        try:
            _send(self.socket_address, lines)
        except OSError as error:
            with self._failing_lock:
                first = not self._failing
                self._failing = True
            if first:
                self.bus.log(
                    f"sd_notify: cannot reach systemd at {self.socket_address!r} "
                    f"({error}); further failures are not logged.",
                    level=logging.WARNING,
                )
            return False
        if self._failing:
            with self._failing_lock:
                self._failing = False
        return True

    def status(self, text: str) -> bool:
        """Set the status line shown by ``systemctl status``.

        Newlines would start new protocol lines, so they become spaces.
        """
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    # -- bus listeners ---------------------------------------------------

    def subscribe(self) -> None:
        """Subscribe to the bus, including the second ``graceful`` listener."""
        super().subscribe()
        self.bus.subscribe("graceful", self.reloaded)

    def unsubscribe(self) -> None:
        """Undo ``subscribe()``."""
        super().unsubscribe()
        self.bus.unsubscribe("graceful", self.reloaded)

    def start(self) -> None:
        """Tell systemd we are ready, and start the watchdog pings."""
        if not self.enabled:
            return
        self.notify("READY=1", f"MAINPID={os.getpid()}", "STATUS=" + self.ready_status)
        self._start_watchdog()

    start.priority = START_PRIORITY  # type: ignore[attr-defined]

    def graceful(self) -> None:
        """Tell systemd a reload begins (before the other graceful listeners)."""
        if not self.enabled:
            return
        self.notify(
            "RELOADING=1",
            f"MONOTONIC_USEC={monotonic_usec()}",
            "STATUS=" + self.reloading_status,
        )

    graceful.priority = RELOADING_PRIORITY  # type: ignore[attr-defined]

    def reloaded(self) -> None:
        """Tell systemd the reload is over (after the other graceful listeners)."""
        if not self.enabled:
            return
        self.notify("READY=1", "STATUS=" + self.ready_status)

    reloaded.priority = RELOADED_PRIORITY  # type: ignore[attr-defined]

    def stop(self) -> None:
        """Stop the watchdog pings, then tell systemd we are stopping.

        In this order no WATCHDOG=1 can follow STOPPING=1.
        """
        if not self.enabled:
            return
        self._stop_watchdog()
        self.notify("STOPPING=1", "STATUS=" + self.stopping_status)

    stop.priority = STOP_PRIORITY  # type: ignore[attr-defined]

    def exit(self) -> None:
        """Make sure the watchdog thread is gone."""
        self._stop_watchdog()

    # -- watchdog --------------------------------------------------------

    def watchdog_interval(self) -> float | None:
        """Return the seconds between WATCHDOG=1 pings, or None if disabled.

        The pings go at half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3)
        advises, and only from the process named by ``$WATCHDOG_PID`` (any
        process when unset). An unusable value is logged and disables them.
        """
        if not self.enabled or not self._watchdog_usec:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                self._log_bad_value("WATCHDOG_PID", self._watchdog_pid)
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            usec = 0
        if usec <= 0:
            self._log_bad_value("WATCHDOG_USEC", self._watchdog_usec)
            return None
        return usec / 2 / 1_000_000

    def _log_bad_value(self, name: str, value: str) -> None:
        self.bus.log(
            f"sd_notify: ignoring {name}={value!r}; no watchdog pings.",
            level=logging.WARNING,
        )

    def _start_watchdog(self) -> None:
        interval = self.watchdog_interval()
        if interval is None:
            return
        with self._watchdog_lock:
            if self.watchdog is not None and self.watchdog.is_alive():
                return
            self.watchdog = BackgroundTask(
                interval,
                self.notify,
                args=("WATCHDOG=1",),
                bus=self.bus,
                name="sd_notify watchdog",
                # A failed ping must not end the pings: systemd would kill busd.
                keep_running=True,
            )
            self.watchdog.start()
        self.bus.log(f"sd_notify: watchdog pings every {interval:g} s.")

    def _stop_watchdog(self) -> None:
        with self._watchdog_lock:
            task, self.watchdog = self.watchdog, None
        if task is None:
            return
        task.cancel()
        if task is not threading.current_thread():
            task.join()
