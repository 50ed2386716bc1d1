"""Detach from the terminal the classic way: two forks and a new session.

By default this does what ``cherrypy.process.plugins.Daemonizer`` does:
``start`` forks twice (the parent that the shell waits for exits with
status 0 straight away), starts a new session, sets the umask to 0 and
points stdin/stdout/stderr at the given files. It neither changes
directory nor closes any other descriptor: whatever the program opened
before (a logging file handler, say) keeps its descriptor and goes on
writing to its own file. Everything after that, including the PID file
(priority 70), runs in the daemon.

A daemon that must not hand descriptors on to the programs it runs (busd
itself) asks for ``close_inherited=True``: the descriptors this process
was *given* by its launcher are closed, those it opened itself stay. The
two are told apart by the close-on-exec flag: Python opens everything
non-inheritable (PEP 446), so an inheritable descriptor above 2 came
through ``exec`` from the launcher, or was made inheritable on purpose
(name those in ``files_preserve``). Closing every descriptor instead, as
python-daemon's ``DaemonContext`` does when asked for no list, leaves the
Python objects that hold them with dead numbers that the next ``open``
reuses, and their writes land in the wrong file (the PID file, typically).
The forks, the session, the umask and stdio are ``DaemonContext``'s work;
this module only chooses what it keeps.

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
from collections.abc import Callable, Iterable
from typing import IO, TYPE_CHECKING, Any

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
    for appending), as in CherryPy. The keywords are busd's, for a daemon
    that wants more than CherryPy's defaults:

    - ``working_directory``: change to it after detaching (None: stay);
    - ``umask``: the daemon's umask (CherryPy's 0 by default);
    - ``close_inherited``: close the inheritable descriptors above 2 (those
      the launcher passed down), except those in ``files_preserve``
      (descriptors or file objects). Descriptors this program opened
      itself are never closed. Signal handling is left alone, so that the
      SignalHandler plugin owns the signals.

    ``finalized`` is True once this process is the daemon. After ``start``
    the original process has exited with status 0: its exit status says
    only that the first fork worked, not that the daemon started; wait for
    the PID file.
    """

    def __init__(
        self,
        bus: Bus,
        stdin: str = "/dev/null",
        stdout: str = "/dev/null",
        stderr: str = "/dev/null",
        *,
        working_directory: str | None = None,
        umask: int = 0,
        close_inherited: bool = False,
        files_preserve: Iterable[int | IO[Any]] = (),
    ) -> None:
        super().__init__(bus)
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.working_directory = working_directory
        self.umask = umask
        self.close_inherited = close_inherited
        self.files_preserve = list(files_preserve)
        #: True once this process is the daemon (CherryPy's name).
        self.finalized = False

    @property
    def daemonized(self) -> bool:
        """The same as ``finalized``: this process is the daemon."""
        return self.finalized

    def start(self) -> None:
        """Detach, unless that is unsafe or pointless (then raise RuntimeError)."""
        if self.finalized:
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
        self.finalized = True
        self.bus.log(f"Daemonized: PID {os.getpid()}, session {os.getsid(0)}.")

    start.priority = START_PRIORITY  # type: ignore[attr-defined]

    def _detach(self) -> None:
        _detach(
            (self.stdin, self.stdout, self.stderr),
            working_directory=self.working_directory,
            umask=self.umask,
            close_inherited=self.close_inherited,
            keep=_descriptors(self.files_preserve),
        )

    @staticmethod
    def daemonize(
        stdin: str = "/dev/null",
        stdout: str = "/dev/null",
        stderr: str = "/dev/null",
        logger: Callable[[str], object] = lambda msg: None,
    ) -> None:
        """Detach now, with CherryPy's defaults, without a bus or its checks.

        CherryPy's ``Daemonizer.daemonize``: the caller continues as the
        daemon; ``logger`` is told the daemon's PID.
        """
        _detach((stdin, stdout, stderr))
        logger(f"Daemonized: PID {os.getpid()}, session {os.getsid(0)}.")


def _detach(
    paths: tuple[str, str, str],
    working_directory: str | None = None,
    umask: int = 0,
    close_inherited: bool = False,
    keep: frozenset[int] = frozenset(),
) -> None:
    """Fork twice around a new session; the caller continues as the daemon.

    ``paths`` become stdin (read) and stdout, stderr (append). The work is
    python-daemon's ``DaemonContext``; what it closes is chosen here: it
    closes every descriptor not in ``files_preserve``, so that list holds
    every open one but those ``close_inherited`` asks to close.
    """
    from daemon import DaemonContext  # not at import: only a daemonizing start

    # Opened before any chdir, so that relative paths mean what the caller
    # meant, and before forking, so that a bad path fails the start in the
    # process the shell waits for.
    stdin, stdout, stderr = paths
    streams = [
        open(stdin),  # noqa: SIM115 - closed once copied onto 0
        open(stdout, "a+"),  # noqa: SIM115
        open(stderr, "a+"),  # noqa: SIM115
    ]
    try:
        # Whatever sits in the stdio buffers was written by the launcher;
        # flush it now, or the daemon would write it a second time.
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        closing = _inherited(keep) if close_inherited else set()
        context = DaemonContext(
            detach_process=True,  # also when started by init or inetd
            signal_map={},  # the SignalHandler plugin owns the signals
            # DaemonContext always changes directory: to "stay", to here.
            working_directory=working_directory or os.getcwd(),
            umask=umask,
            prevent_core=False,  # CherryPy's daemon may dump core; so may ours
            files_preserve=[
                fd for fd in _open_descriptors() if fd > 2 and fd not in closing
            ],
            stdin=streams[0],
            stdout=streams[1],
            stderr=streams[2],
        )
        context.open()
    finally:
        # dup2 copied them onto 0, 1 and 2; these extra descriptors can go.
        for stream in streams:
            stream.close()


def _open_descriptors() -> list[int]:
    """This process's open descriptors (/proc's own listing one left out)."""
    listed = [int(name) for name in os.listdir("/proc/self/fd")]
    open_now = []
    for fd in listed:
        try:
            os.fstat(fd)
        except OSError:
            continue  # the descriptor listdir itself used, now closed
        open_now.append(fd)
    return open_now


def _descriptors(files: Iterable[int | IO[Any]]) -> frozenset[int]:
    return frozenset(file if isinstance(file, int) else file.fileno() for file in files)


def _inherited(keep: frozenset[int]) -> set[int]:
    """The inheritable descriptors above 2 that are not in ``keep``.

    Non-inheritable ones were opened by this program (Python's default),
    and the objects holding them must stay valid.
    """
    inherited = set()
    for fd in _open_descriptors():
        if fd > 2 and fd not in keep and os.get_inheritable(fd):
            inherited.add(fd)
    return inherited
