"""Workers an earlier busd left behind: found by their mark, and ended.

A busd that crashed (kill -9) leaves its workers running, deaf (their stdin
is closed). Each carries busd's identity (its socket path) in its
environment; the next busd with that identity ends them at start, in a
thread of its own so that the search does not slow the start down.
"""

from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger("busd")


def end_orphans(mark: str, identity: str, spare: int | None = None) -> list[int]:
    """Kill workers that an earlier busd with this identity left running.

    Neither busd's own children nor those of ``spare`` (its fork server)
    are orphans.
    """
    import psutil  # here, in a thread of its own (Supervisor.start)

    ours = {os.getpid(), spare}
    found = []
    for process in psutil.process_iter(["pid", "ppid"]):
        if process.pid in ours or process.info["ppid"] in ours:
            continue
        try:
            environment = process.environ()
        except (psutil.Error, OSError):
            continue
        if environment.get(mark) != identity:
            continue
        # A forked worker shows its fork server's environment: no broker.
        broker = environment.get("BUSD_BROKER")
        log.warning(
            "Ending worker PID %d of broker %s left by an earlier busd",
            process.pid,
            broker or "? (its fork server or a worker it forked)",
        )
        found.append(process)
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(found, timeout=5)
    return [p.pid for p in found]
