"""The states of an instance (a worker process), and the moves between them.

Every transition goes through ``Instance.change_state``, which refuses any
move this table does not list::

                 start()           "ready" frame
      STOPPED ------------> STARTING ------------> RUNNING
         ^  ^                 |    \\                 |   \\
         |   \\   stop()       |     \\ exit           |    \\ stop()
         |    \\-------- STOPPING <---\\-------------------/   (ask, SIGTERM,
         |                            \\             | exit      SIGKILL)
         |        backoff timer        V             V
         |   BACKOFF <------------- (exited unexpectedly: restart policy)
         |      |   more failed starts in a row than start_retries
         |      +---------------------------> FATAL   (busctl start resets)
         +--- restart policy says no, or stop() while in BACKOFF/FATAL
"""

from __future__ import annotations

import enum


class InstanceState(enum.Enum):
    """Where a worker process is in its life (see the module diagram)."""

    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    FATAL = "FATAL"


S = InstanceState

#: The moves ``change_state`` allows, from each state.
ALLOWED: dict[InstanceState, frozenset[InstanceState]] = {
    S.STOPPED: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.RUNNING, S.STOPPING, S.BACKOFF, S.FATAL, S.STOPPED}),
    S.RUNNING: frozenset({S.STOPPING, S.BACKOFF, S.FATAL, S.STOPPED}),
    S.BACKOFF: frozenset({S.STARTING, S.STOPPED}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.FATAL: frozenset({S.STARTING, S.STOPPED}),
}

#: States that tell whether a start worked: RUNNING, or failed (BACKOFF:
#: a retry is due, maybe for ever; FATAL; STOPPED). Start, reload and the
#: lifecycle ops wait for every instance to reach one.
SETTLED = frozenset({S.RUNNING, S.BACKOFF, S.FATAL, S.STOPPED})

#: States with a worker process (or one on its way): start() does nothing.
ALIVE = frozenset({S.STARTING, S.RUNNING, S.STOPPING})

#: States where a restart is pending or was given up: stop() just stops.
WAITING = frozenset({S.BACKOFF, S.FATAL})
