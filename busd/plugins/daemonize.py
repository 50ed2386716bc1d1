"""Detach from the terminal the classic way, with python-daemon.

``start`` forks twice (the parent that the shell waits for exits with
status 0 straight away), starts a new session, changes directory and
umask, closes every file descriptor not named in ``files_preserve`` and
points stdin/stdout/stderr at the given files. Everything after that,
including the PID file (priority 70), runs in the daemon.

Only for running by hand or from a SysV-style script. Under systemd use
``Type=notify`` and run ``busd run`` in the foreground: systemd then knows
the real main PID and when the service is ready, which it cannot learn from
a process that forks away. This plugin refuses to run there.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any

from daemon import DaemonContext

from busd.bus import states
from busd.plugins.base import SimplePlugin

if TYPE_CHECKING:
    from busd.bus import Bus

__all__ = ["Daemonizer"]

# First of the start steps that touch the process: fork before anything
# holds a lock or a socket (the PID file at 70 must name the daemon's PID,
# and a lock taken before fork would be shared with the parent that exits)
# and before any start listener runs threads, which fork does not copy.
START_PRIORITY = 65

# systemd sets these in the environment of the processes it starts.
SYSTEMD_ENVIRONMENT = ("NOTIFY_SOCKET", "INVOCATION_ID")


class Daemonizer(SimplePlugin):
    """Turn the process into a daemon at ``start``.

    ``stdin``, ``stdout`` and ``stderr`` are paths (opened for reading, and
    for appending). ``files_preserve`` lists descriptors or file objects
    that must survive: every other descriptor is closed, including those of
    Python objects opened earlier (a log file handler, say), whose later use
    or ``close()`` would then hit a reused number. Signal handling
    is left alone (python-daemon's ``signal_map`` is empty), so that the
    SignalHandler plugin owns the signals.

    After ``start`` the calling process is the daemon; the original process
    has exited with status 0. Its exit status therefore says only that the
    first fork worked, not that the daemon started: wait for the PID file.
    """

    def __init__(
        self,
        bus: Bus,
        stdin: str = "/dev/null",
        stdout: str = "/dev/null",
        stderr: str = "/dev/null",
        working_directory: str = "/",
        umask: int = 0o022,
        files_preserve: Iterable[int | IO[Any]] = (),
    ) -> None:
        super().__init__(bus)
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.working_directory = working_directory
        self.umask = umask
        self.files_preserve = list(files_preserve)
        self.daemonized = False

    def start(self) -> None:
        """Detach, unless that is unsafe or pointless (then raise RuntimeError)."""
        if self.daemonized:
            self.bus.log("Already daemonized.", level=logging.DEBUG)
            return
        if self.bus.state is states.STARTED:
            raise RuntimeError(
                "refusing to daemonize: the bus is already STARTED. fork() "
                "copies only the calling thread, so the threads and locks the "
                "start listeners set up would be broken in the daemon; "
                "daemonize from the start channel, before they run"
            )
        found = [name for name in SYSTEMD_ENVIRONMENT if os.environ.get(name)]
        if found:
            raise RuntimeError(
                f"refusing to daemonize under systemd ({' and '.join(found)} "
                "set): a process that forks away hides its real PID and "
                "readiness from systemd. Use Type=notify in the unit and run "
                "`busd run` in the foreground instead"
            )
        current = threading.current_thread()
        others = [t.name for t in threading.enumerate() if t is not current]
        if others:
            self.bus.log(
                f"Daemonizing with other threads running ({', '.join(others)}): "
                "they will not exist in the daemon.",
                level=logging.WARNING,
            )
        self._detach()
        self.daemonized = True
        self.bus.log(f"Daemonized: PID {os.getpid()}, session {os.getsid(0)}.")

    start.priority = START_PRIORITY  # type: ignore[attr-defined]

    def _detach(self) -> None:
        # Paths are opened here, before the context changes directory, so
        # that relative ones mean what the caller meant.
        streams = [
            open(self.stdin),  # noqa: SIM115 - kept open as the new fd 0
            open(self.stdout, "a+"),  # noqa: SIM115
            open(self.stderr, "a+"),  # noqa: SIM115
        ]
        # Whatever sits in the stdio buffers was written by the launcher; flush
        # it now, or the daemon would write it a second time after fork.
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        context = DaemonContext(
            detach_process=True,
            signal_map={},
            working_directory=self.working_directory,
            umask=self.umask,
            files_preserve=list(self.files_preserve),
            stdin=streams[0],
            stdout=streams[1],
            stderr=streams[2],
        )
        try:
            context.open()
        finally:
            # dup2 copied them onto 0, 1 and 2; these extra descriptors can go.
            for stream in streams:
                stream.close()
