"""busd as a child subreaper, and the strays that makes its own.

busd marks itself a *child subreaper* (``PR_SET_CHILD_SUBREAPER``): a
process below it whose parent dies is re-parented to busd instead of to
init. That is how every worker becomes busd's own child (the fork server
hands it over, busd/forkserver.py), so busd alone reaps it and gets its
exit status, whatever becomes of the fork server.

It also makes busd the parent of whatever a worker leaves behind (a
program a broker started, a middle process of a fork server that died
mid-spawn). Nobody waits for those: :class:`StrayReaper` collects them,
but only a zombie that nobody claimed for a whole sweep, so that a
``subprocess`` call in busd, or a worker busd has not heard of yet, keeps
its own exit status.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from collections.abc import Callable

log = logging.getLogger("busd")

PR_SET_CHILD_SUBREAPER = 36
#: How often busd looks for zombie children that nobody collects.
SWEEP_SECONDS = 1.0


def become_subreaper() -> None:
    """Have the kernel re-parent this process's orphaned descendants to it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def zombie_children(parent: int) -> set[tuple[int, int]]:
    """(PID, start time) of each zombie child of ``parent``, from /proc."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                text = stat.read()
        except OSError:
            continue
        # "pid (comm) S ppid ...": comm may hold spaces and parentheses.
        fields = text[text.rfind(b")") + 2 :].split()
        if fields[0] == b"Z" and int(fields[1]) == parent:
            found.add((int(entry), int(fields[19])))
    return found


class StrayReaper:
    """Collects busd's zombie children that nobody else collects.

    ``claimed(pid)`` says whether someone collects that child itself (a
    worker's pidfd, a fork server's Popen). A zombie not claimed is reaped
    when a sweep finds it a second time, a sweep apart.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        claimed: Callable[[int], bool],
        interval: float = SWEEP_SECONDS,
    ) -> None:
        self.loop = loop
        self.claimed = claimed
        self.interval = interval
        #: How many strays it reaped.
        self.reaped = 0
        self._seen: set[tuple[int, int]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Sweep every ``interval`` seconds from now on (on the loop)."""
        if self._timer is None:
            self._timer = self.loop.call_later(self.interval, self._tick)

    def stop(self) -> None:
        """No more sweeps."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self._timer = self.loop.call_later(self.interval, self._tick)
        self.sweep()

    def sweep(self) -> list[int]:
        """Reap the unclaimed zombies the last sweep saw too; their PIDs."""
        try:
            # One system call says whether there is any zombie child at all.
            anyone = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            anyone = None
        if anyone is None:
            self._seen = set()
            return []
        zombies = {
            key for key in zombie_children(os.getpid()) if not self.claimed(key[0])
        }
        reaped = []
        for pid, _started in zombies & self._seen:
            try:
                found, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if found:
                reaped.append(pid)
                log.info(
                    "Collected PID %d, a process left to busd (exit %d)",
                    pid,
                    os.waitstatus_to_exitcode(status),
                )
        self.reaped += len(reaped)
        self._seen = {key for key in zombies if key[0] not in reaped}
        return reaped
