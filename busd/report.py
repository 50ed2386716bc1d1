"""The ``state`` answer: the bus, this process, the router, every broker.

One module builds what ``busctl state`` shows, so that every reader of
busd's state (the ``state`` op today; a status page or metrics later)
reads the same figures from the same place. It reads the objects it is
given and changes nothing.

It also judges busd's **health**, one summary that scripts branch on
(``busctl state`` exits 3 when it is degraded): *healthy* when every
instance that should run is RUNNING. An instance should run from its
start until it is stopped on purpose (``busctl stop``, ``scale`` down, a
shutdown) or the restart policy leaves it stopped after a clean exit
(status 0, after it was ready, with ``restart = "on-failure"`` or
``"never"``). So STARTING, BACKOFF, FATAL, a restart under way, and a
STOPPED instance that failed under ``restart = "never"`` are each a reason
for *degraded*.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from busd._version import __version__
from busd.protocol import PROTOCOL_VERSION
from busd.supervision.states import InstanceState

RUNNING = InstanceState.RUNNING

if TYPE_CHECKING:
    import psutil

    from busd.bus import Bus
    from busd.router import Router
    from busd.supervision.broker import Broker
    from busd.supervision.instance import Instance
    from busd.supervision.launch import WorkerLauncher
    from busd.supervision.supervisor import Supervisor


class Report:
    """Builds the ``state`` answer from what busd's parts say of themselves."""

    def __init__(
        self,
        bus: Bus,
        router: Router,
        supervisor: Supervisor,
        launcher: WorkerLauncher,
        clients: Callable[[], int],
        config_path: str | None,
        socket_path: str,
    ) -> None:
        self.bus = bus
        self.router = router
        self.supervisor = supervisor
        self.launcher = launcher
        self.clients = clients
        self.config_path = config_path
        self.socket_path = socket_path
        #: When the start was complete (time.time()); None before.
        self.started_at: float | None = None
        self._ps: dict[int, psutil.Process] = {}  # PID -> its psutil handle

    def mark_started(self) -> None:
        """The start is complete: uptime counts from now."""
        self.started_at = time.time()

    def state(self) -> dict[str, Any]:
        """The ``state`` op's answer: the bus, this process, the counters."""
        import psutil  # not at start: busd's start is on the clock

        process = psutil.Process()
        with process.oneshot():
            memory = process.memory_info()
            usage = {
                "cpu_percent": process.cpu_percent(None),
                "rss": memory.rss,
                "fds": process.num_fds(),
                "threads": process.num_threads(),
            }
        now = time.time()
        return {
            "state": self.bus.state.name,
            "pid": os.getpid(),
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "uptime": 0.0 if self.started_at is None else now - self.started_at,
            "config": self.config_path,
            "socket": self.socket_path,
            "uid": os.getuid(),
            "gid": os.getgid(),
            "process": usage,
            "fork_server": self.launcher.fork_server_pid(),
            # Its restarts, last death and next start (busctl state --json).
            "fork_server_health": self.launcher.fork_server_state(),
            "clients": self.clients(),
            "published": self.router.published,
            "unrouted": self.router.unrouted,
            "health": self.health(),
            "dead_letters": len(self.router.dead_letters),
            "dead_letters_overflowed": self.router.dead_letters.overflowed,
            "brokers": {
                name: self.broker(broker)
                for name, broker in self.supervisor.brokers.items()
            },
        }

    def health(self) -> dict[str, Any]:
        """``{"status": "healthy" | "degraded", "reasons": [...]}``.

        One reason per instance that should run and is not RUNNING, as
        ``orders:0 FATAL (5 failed starts)``; see the module docstring.
        """
        reasons = [
            f"{instance.name} {instance.condition()}"
            for broker in self.supervisor.brokers.values()
            for instance in broker.instances
            if instance.wanted and instance.state is not RUNNING
        ]
        return {"status": "degraded" if reasons else "healthy", "reasons": reasons}

    def broker(self, broker: Broker) -> dict[str, Any]:
        """One broker's row of ``busctl state`` (and the lifecycle ops' answer)."""
        config = broker.config
        return {
            "channels": list(config.channels),
            "handler": config.handler,
            "command": list(config.command) if config.command else None,
            "queued": len(broker.queue),
            "queue_size": config.queue_size,
            "start_retries": config.start_retries,
            "accepted": broker.accepted,
            "acked": broker.acked_count,
            "retried": broker.retried,
            "dead": broker.dead,
            "redelivered": broker.redelivered,
            "instances": [self.instance(i) for i in broker.instances],
        }

    def instance(self, instance: Instance) -> dict[str, Any]:
        """One instance's figures: state, PID, uptime, psutil usage, counters.

        Also why it is not running: ``failures`` (failed starts in a row),
        ``next_try`` (seconds until the restart due in BACKOFF, else None),
        ``exit_cause`` (why its last process ended unexpectedly, and when),
        and ``should_run`` (whether health asks for it).
        """
        retry_at = instance.retry_at
        row: dict[str, Any] = {
            "index": instance.index,
            "state": instance.state.name,
            "pid": instance.pid,
            "uptime": time.time() - instance.started_at
            if instance.pid and instance.started_at
            else 0.0,
            "restarts": instance.restarts,
            "inflight": len(instance.inflight),
            "acked": instance.acked,
            "nacked": instance.nacked,
            "last_exit": instance.last_exit,
            "failures": instance.failures,
            "next_try": None
            if retry_at is None
            else max(0.0, retry_at - time.monotonic()),
            "exit_cause": instance.exit_cause,
            "should_run": instance.wanted,
        }
        if instance.pid:
            import psutil  # not at start: busd's start is on the clock

            process = self._ps.get(instance.pid)
            try:
                if process is None:
                    process = self._ps[instance.pid] = psutil.Process(instance.pid)
                with process.oneshot():
                    row["cpu_percent"] = process.cpu_percent(None)
                    row["rss"] = process.memory_info().rss
                    row["fds"] = process.num_fds()
            except psutil.Error:
                self._ps.pop(instance.pid, None)
        return row
