"""The broker supervisor: every broker of the config, started and stopped.

``Supervisor`` is a bus plugin of the daemon. On ``start`` (priority 80:
after privileges are dropped, before systemd hears READY) it starts every
broker's instances and waits until each is RUNNING or has clearly failed,
then ends workers left by a crashed busd. On ``stop`` (priority 60: before
the I/O loop, which carries the workers' pipes, stops) it stops them all.
``reconfigure()`` applies a reloaded config with rolling restarts.

It is given what it hands on (``links``): the I/O loop to work on, the
launcher of worker processes, where settled messages and workers'
publishes go, where its brokers are announced as routes, and where
events go. It knows nothing of sockets, clients or the daemon.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from busd.config import BrokerConfig, Config
from busd.ioloop import IOLoop
from busd.plugins.base import SimplePlugin
from busd.protocol import DEAD_CHANNEL, FrameEncoder
from busd.spawner import ORPHAN_MARK
from busd.supervision.broker import Broker
from busd.supervision.instance import Instance
from busd.supervision.launch import WorkerLauncher
from busd.supervision.orphans import end_orphans
from busd.supervision.services import (
    InstanceView,
    PoolServices,
    RestartTiming,
    Settle,
)
from busd.supervision.states import SETTLED, InstanceState

log = logging.getLogger("busd")

# After the privilege drop (77): workers run as busd's user unless their
# broker names another. Before READY (90): systemd hears "ready" only once
# the brokers are.
START_PRIORITY = 80
# Before the I/O loop (95) stops: it carries the workers' pipes.
STOP_PRIORITY = 60
# How long start and reload wait for instances to be RUNNING (or to fail).
READY_WAIT = 30.0
# How often in-flight messages are checked against ack_timeout.
ACK_CHECK_SECONDS = 0.5
#: The source name of the supervisor's routes in the router.
LOCAL_ROUTES = "local"


class SupervisorLinks(NamedTuple):
    """What the supervisor is given, and hands on to its brokers."""

    ioloop: IOLoop
    launcher: WorkerLauncher
    #: Where a broker reports a settled delivery (the router's ``settle``).
    settle: Settle
    #: A worker's publish: (origin, channel, message) (the router's).
    publish: Callable[[str, str, Any], None]
    #: The brokers are now these routes: (source, routes) (the router's).
    set_routes: Callable[[str, Iterable[Broker]], None]
    #: An event for ``busctl events`` followers.
    emit: Callable[[dict[str, Any]], None]
    timing: RestartTiming = RestartTiming()


class Supervisor(SimplePlugin):
    """Starts, watches and stops the brokers."""

    def __init__(self, bus: Any, config: Config, links: SupervisorLinks) -> None:
        super().__init__(bus)
        self.config = config
        self.links = links
        self.ioloop = links.ioloop
        self.launcher = links.launcher
        self.brokers: dict[str, Broker] = {}
        self._services: PoolServices | None = None
        self._changed: asyncio.Condition | None = None
        self._ack_watch: asyncio.Task[Any] | None = None

    # -- bus listeners (main thread) ---------------------------------------------

    def start(self) -> None:
        """Start every broker, wait for them, then end orphans."""
        # On the main thread, after the privilege drop: the fork server
        # takes busd's credentials now (see WorkerLauncher.spawner). With no
        # broker yet, it is started when the first one is (a reload).
        spare = self.launcher.spawner().pid if self.config.brokers else None
        self.ioloop.run(self._start(self.config))
        # Workers a crashed busd left are ended now, in the background: they
        # hear nothing from busd any more (their stdin is closed), and the
        # search (psutil's import, /proc) would slow the start down. They are
        # neither our children nor the fork server's, so the new workers are
        # never taken for them.
        threading.Thread(
            target=end_orphans,
            args=(ORPHAN_MARK, self.launcher.identity, spare),
            name="busd-orphans",
            daemon=True,
        ).start()

    start.priority = START_PRIORITY  # type: ignore[attr-defined]

    def stop(self) -> None:
        """Stop every broker's instances: ask, SIGTERM, SIGKILL."""
        if self.ioloop.running:
            self.ioloop.run(self._stop_all())
        self.launcher.wait_closed()

    stop.priority = STOP_PRIORITY  # type: ignore[attr-defined]

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config: add, remove, rolling-restart brokers."""
        self.config = config
        self.ioloop.run(self._reconfigure(config))

    # -- on the loop ----------------------------------------------------------------

    def services(self) -> PoolServices:
        """What every broker and instance is given (made on the loop)."""
        if self._services is None:
            links = self.links
            self._services = PoolServices(
                launch=self.launcher,
                outbox=self.ioloop.outbox,
                encode=FrameEncoder(),
                background=self.ioloop.background,
                settle=links.settle,
                publish=links.publish,
                state_changed=self._announce,
                log_line=_worker_log,
                wait_settled=self.wait_settled,
                timing=links.timing,
            )
        return self._services

    async def _start(self, config: Config) -> None:
        self._changed = asyncio.Condition()
        for broker_config in config.brokers.values():
            self._add(broker_config)
        self._publish_routes()
        await asyncio.gather(
            *(b.scale(b.config.instances) for b in self.brokers.values())
        )
        self._ack_watch = self.ioloop.background(self._watch_acks())
        await self.wait_settled(self.all_instances())
        for broker in self.brokers.values():
            log.info(
                "Broker %s: %d of %d instances running",
                broker.name,
                broker.running(),
                len(broker.instances),
            )

    async def _watch_acks(self) -> None:
        """Every ``ACK_CHECK_SECONDS``, kill instances that hold a message
        longer than their broker's ``ack_timeout``."""
        while True:
            await asyncio.sleep(ACK_CHECK_SECONDS)
            now = time.monotonic()
            for instance in self.all_instances():
                instance.check_ack_timeout(now)

    async def _stop_all(self) -> None:
        if self._ack_watch is not None:
            self._ack_watch.cancel()
        # First: the workers need no fork server (busd is their parent), and
        # a start still waiting for one (during its back-off) fails now
        # instead of holding the stop up.
        self.launcher.close()
        await asyncio.gather(*(b.stop() for b in self.brokers.values()))

    async def _reconfigure(self, config: Config) -> None:
        new = dict(config.brokers)
        for name in [n for n in self.brokers if n not in new]:
            log.info("Broker %s: removed from the config; stopping it", name)
            broker = self.brokers.pop(name)
            self._publish_routes()
            await broker.stop()
            # Stopped, it holds its unacknowledged messages in its queue, and
            # no instance will ever take them: settle them, or they (and a
            # publish --wait on them) would wait forever.
            stranded = broker.abandon(f"broker {name} was removed from the config")
            if stranded:
                log.warning(
                    "Broker %s: removed from the config with %d messages not "
                    "acknowledged; they are dead (sent to the %r channel)",
                    name,
                    stranded,
                    DEAD_CHANNEL,
                )
        for name, broker_config in new.items():
            existing = self.brokers.get(name)
            if existing is None:
                log.info("Broker %s: new in the config; starting it", name)
                broker = self._add(broker_config)
                self._publish_routes()
                await broker.scale(broker_config.instances)
            elif existing.config != broker_config:
                only_count = _same_but_instances(existing.config, broker_config)
                _warn_if_user_ignored(broker_config)
                existing.reconfigure(broker_config)
                self._publish_routes()
                await existing.scale(broker_config.instances)
                if not only_count:
                    log.info("Broker %s: config changed; rolling restart", name)
                    await existing.restart()
        self._publish_routes()
        await self.wait_settled(self.all_instances())

    def _add(self, config: BrokerConfig) -> Broker:
        _warn_if_user_ignored(config)
        broker = Broker(config, self.services())
        self.brokers[config.name] = broker
        return broker

    def _publish_routes(self) -> None:
        self.links.set_routes(LOCAL_ROUTES, self.brokers.values())

    def all_instances(self) -> list[Instance]:
        """Every instance of every broker."""
        return [i for b in self.brokers.values() for i in b.instances]

    async def wait_settled(
        self, instances: Iterable[InstanceView], timeout: float = READY_WAIT
    ) -> None:
        """Wait until each instance is RUNNING or has failed (BACKOFF, FATAL,
        STOPPED: ``states.SETTLED``), or ``timeout``."""
        waited = list(instances)
        assert self._changed is not None
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(
                        lambda: all(i.state in SETTLED for i in waited)
                    ),
                    timeout,
                )
            except TimeoutError:
                late = [i.name for i in waited if i.state not in SETTLED]
                log.warning(
                    "Still not running after %g s: %s", timeout, ", ".join(late)
                )

    def _announce(
        self, instance: InstanceView, old: InstanceState, reason: str
    ) -> None:
        """An instance changed state: log it, tell ``events``, wake waiters."""
        log.info(
            "%s: %s -> %s%s",
            instance,
            old.name,
            instance.state.name,
            f" ({reason})" if reason else "",
        )
        self.links.emit(
            {
                "type": "broker",
                "broker": instance.config.name,
                "instance": instance.index,
                "state": instance.state.name,
                "pid": instance.pid,
                "time": time.time(),
            }
        )
        if self._changed is not None:
            changed = self._changed

            async def notify() -> None:
                async with changed:
                    changed.notify_all()

            self.ioloop.background(notify())


def _worker_log(instance: InstanceView, pid: int, line: str) -> None:
    """A line a worker wrote on stderr: into busd's log, with its origin."""
    level = logging.INFO
    for name in ("ERROR", "WARNING", "CRITICAL", "DEBUG"):
        if line.startswith(f"{name}: "):
            level = logging.getLevelName(name)
            line = line[len(name) + 2 :]
            break
    extra = {
        "source": instance.config.name,
        "instance": instance.index,
        "pid": pid,
        "line": line,
    }
    log.log(level, "%s[%d] %s", instance.name, pid, line, extra=extra)


def _warn_if_user_ignored(config: BrokerConfig) -> None:
    """A broker's own ``user`` needs busd to run as root: say so if it does not."""
    if config.user != "" and os.geteuid() != 0:
        log.warning(
            "Broker %s: user = %r is ignored: busd runs as uid %d, not root, "
            "so its workers run as busd's user",
            config.name,
            config.user,
            os.geteuid(),
        )


def _same_but_instances(old: BrokerConfig, new: BrokerConfig) -> bool:
    return dataclasses.replace(old, instances=new.instances) == new
