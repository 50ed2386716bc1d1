"""The broker supervisor: every broker of the config, and the routes to them.

``Supervisor`` is a bus plugin of the daemon. On ``start`` (priority 80:
after privileges are dropped, before systemd hears READY) it ends workers
left by a crashed busd, starts every broker's instances and waits until
each is RUNNING or has clearly failed. On ``stop`` (priority 60: before the
control server closes its event loop, which carries the workers' pipes) it
stops them all. ``reconfigure()`` applies a reloaded config with rolling
restarts.

The supervisor's own work runs on the control server's I/O loop; the bus
listeners here only hand coroutines to it and wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import threading
import time
from collections.abc import Coroutine, Iterable
from typing import TYPE_CHECKING, Any

from busd.broker import DEAD_CHANNEL, Broker
from busd.config import BrokerConfig, Config
from busd.control import Pending
from busd.instance import Delivery, Instance, InstanceState
from busd.outbox import Outbox
from busd.plugins.base import SimplePlugin
from busd.protocol import ErrorCode, FrameEncoder, ProtocolError
from busd.spawner import (
    ORPHAN_MARK,
    PACKAGE_ROOT,
    Spawner,
    current_umask,
    server_environment,
)
from busd.spool import Spool, SpoolError

if TYPE_CHECKING:
    from busd.daemon import Daemon

log = logging.getLogger("busd")

# After the privilege drop (77): workers run as busd's user unless their
# broker names another. Before READY (90): systemd hears "ready" only once
# the brokers are.
START_PRIORITY = 80
# Before the control server (90) stops the loop that carries the pipes.
STOP_PRIORITY = 60
# How long start and reload wait for instances to be RUNNING (or to fail).
READY_WAIT = 30.0
# How often in-flight messages are checked against ack_timeout.
ACK_CHECK_SECONDS = 0.5
SETTLED = (InstanceState.RUNNING, InstanceState.FATAL, InstanceState.STOPPED)


class Supervisor(SimplePlugin):
    """Starts, watches and stops the brokers; routes messages to them."""

    #: Environment variable marking a worker as this busd's (orphan search).
    ORPHAN_MARK = ORPHAN_MARK

    def __init__(
        self, bus: Any, daemon: Daemon, spawner: Spawner | None = None
    ) -> None:
        super().__init__(bus)
        self.daemon = daemon
        # The fork server, if `busd run` started it already (see spawner()).
        self._spawner = spawner
        self.brokers: dict[str, Broker] = {}
        self.routes: dict[str, list[Broker]] = {}
        #: Names this busd among others on the machine: its socket path.
        self.identity = daemon.config.busd.socket
        #: Where ``import busd`` works from, for handler workers.
        self.package_root = PACKAGE_ROOT
        self._changed: asyncio.Condition | None = None
        self._ps: dict[int, Any] = {}  # PID -> psutil.Process
        self._tasks: set[asyncio.Task[Any]] = set()
        self.spool: Spool | None = None
        #: Encodes the frames sent to workers (on the I/O loop only).
        self.encode = FrameEncoder()
        self._ack_watch: asyncio.Task[Any] | None = None

    # -- bus listeners (main thread) ---------------------------------------------

    def start(self) -> None:
        """Open the spool, start every broker, end orphans, wait for them."""
        settings = self.daemon.config.busd
        if settings.spool:
            # Opened here, after the PID file is ours: no other busd reads it.
            self.spool = Spool(settings.spool, settings.spool_fsync)
            self.daemon.continue_message_ids_after(self.spool.last_id)
        # On the main thread, after the privilege drop: the fork server
        # takes busd's credentials now (see spawner()). With no broker yet,
        # it is started when the first one is (a reload).
        spare = self.spawner().pid if self.daemon.config.brokers else None
        self._run(self._start(self.daemon.config))
        # Workers a crashed busd left are ended now, in the background: they
        # hear nothing from busd any more (their stdin is closed), and the
        # search (psutil's import, /proc) would slow the start down. They are
        # neither our children nor the fork server's, so the new workers are
        # never taken for them.
        threading.Thread(
            target=end_orphans,
            args=(self.ORPHAN_MARK, self.identity, spare),
            name="busd-orphans",
            daemon=True,
        ).start()

    start.priority = START_PRIORITY  # type: ignore[attr-defined]

    def stop(self) -> None:
        """Stop every broker's instances: ask, SIGTERM, SIGKILL."""
        if self.daemon.control.loop is not None:
            self._run(self._stop_all())
        if self._spawner is not None:
            self._spawner.close()  # no-op if _stop_all closed it on the loop
            self._spawner.wait_closed()
            self._spawner = None
        if self.spool is not None:
            self.spool.close()
            self.spool = None

    stop.priority = STOP_PRIORITY  # type: ignore[attr-defined]

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config: add, remove, rolling-restart brokers."""
        self._run(self._reconfigure(config))

    @property
    def outbox(self) -> Outbox:
        """Where instances queue their writes (the control server's)."""
        outbox = self.daemon.control.outbox
        assert outbox is not None, "the control server is not started"
        return outbox

    def background(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coroutine`` as a task on the loop, keeping it referenced."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coroutine`` on the I/O loop and wait for its result."""
        loop = self.daemon.control.loop
        assert loop is not None, "the control server's loop is not running"
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    # -- on the loop ----------------------------------------------------------------

    async def _start(self, config: Config) -> None:
        self._changed = asyncio.Condition()
        for broker_config in config.brokers.values():
            self._add(broker_config)
        self._route()
        self._requeue_spooled()
        await asyncio.gather(
            *(b.scale(b.config.instances) for b in self.brokers.values())
        )
        self._ack_watch = self.background(self._watch_acks())
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
        await asyncio.gather(*(b.stop() for b in self.brokers.values()))
        if self._spawner is not None:
            self._spawner.close()

    async def _reconfigure(self, config: Config) -> None:
        new = dict(config.brokers)
        for name in [n for n in self.brokers if n not in new]:
            log.info("Broker %s: removed from the config; stopping it", name)
            broker = self.brokers.pop(name)
            self._route()
            await broker.stop()
        for name, broker_config in new.items():
            broker = self.brokers.get(name)
            if broker is None:
                log.info("Broker %s: new in the config; starting it", name)
                broker = self._add(broker_config)
                self._route()
                await broker.scale(broker_config.instances)
            elif broker.config != broker_config:
                only_count = _same_but_instances(broker.config, broker_config)
                _warn_if_user_ignored(broker_config)
                broker.config = broker_config
                self._route()
                if only_count:
                    await broker.scale(broker_config.instances)
                else:
                    log.info("Broker %s: config changed; rolling restart", name)
                    await broker.scale(broker_config.instances)
                    await broker.restart()
        self._route()
        await self.wait_settled(self.all_instances())

    def _requeue_spooled(self) -> None:
        """Queue again what the spool holds from before busd (re)started."""
        if self.spool is None:
            return
        for entry in sorted(self.spool.pending.values(), key=lambda e: e.id):
            for name in sorted(entry.brokers):
                broker = self.brokers.get(name)
                if broker is None:
                    log.error(
                        "Spooled message %d is for broker %s, which is no longer "
                        "configured; it stays in the spool",
                        entry.id,
                        name,
                    )
                    continue
                broker.queue.append(
                    Delivery(entry.id, entry.channel, entry.message, redelivered=True)
                )

    def _add(self, config: BrokerConfig) -> Broker:
        _warn_if_user_ignored(config)
        broker = Broker(self, config)
        self.brokers[config.name] = broker
        return broker

    def _route(self) -> None:
        routes: dict[str, list[Broker]] = {}
        for broker in self.brokers.values():
            for channel in broker.config.channels:
                routes.setdefault(channel, []).append(broker)
        self.routes = routes

    def all_instances(self) -> list[Instance]:
        """Every instance of every broker."""
        return [i for b in self.brokers.values() for i in b.instances]

    async def wait_settled(
        self, instances: Iterable[Instance], timeout: float = READY_WAIT
    ) -> None:
        """Wait until each instance is RUNNING, FATAL or STOPPED, or ``timeout``."""
        instances = list(instances)
        assert self._changed is not None
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(
                        lambda: all(i.state in SETTLED for i in instances)
                    ),
                    timeout,
                )
            except TimeoutError:
                late = [i.name for i in instances if i.state not in SETTLED]
                log.warning(
                    "Still not running after %g s: %s", timeout, ", ".join(late)
                )

    # -- events from instances ---------------------------------------------------

    def announce(self, instance: Instance, old: InstanceState, reason: str) -> None:
        """An instance changed state: log it, tell ``events``, wake waiters."""
        log.info(
            "%s: %s -> %s%s",
            instance,
            old.name,
            instance.state.name,
            f" ({reason})" if reason else "",
        )
        self.daemon.hub.emit(
            {
                "type": "broker",
                "broker": instance.broker.name,
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

            self.background(notify())

    def worker_log(self, instance: Instance, pid: int, line: str) -> None:
        """A line a worker wrote on stderr: into busd's log, with its origin."""
        level = logging.INFO
        for name in ("ERROR", "WARNING", "CRITICAL", "DEBUG"):
            if line.startswith(f"{name}: "):
                level = logging.getLevelName(name)
                line = line[len(name) + 2 :]
                break
        extra = {
            "source": instance.broker.name,
            "instance": instance.index,
            "pid": pid,
            "line": line,
        }
        log.log(level, "%s[%d] %s", instance.name, pid, line, extra=extra)

    # -- routing -------------------------------------------------------------------

    def publish(
        self, message_id: int, channel: str, message: Any, wait: bool = False
    ) -> tuple[int, Pending | None]:
        """Queue ``message`` for every broker on ``channel``.

        Returns how many brokers took it and, with ``wait``, a Pending that
        resolves to ``{"acked": n, "dead": m}`` once every broker settled it.
        Raises ``busy`` when any of those brokers' queues is full: then no
        broker gets it, so a retry does not duplicate it.
        """
        brokers = self.routes.get(channel, ())
        for broker in brokers:
            if not broker.has_room():
                raise ProtocolError(
                    ErrorCode.BUSY,
                    f"broker {broker.name!r} has {len(broker.queue)} messages queued "
                    f"(queue_size {broker.config.queue_size}); try again later",
                )
        if self.spool is not None and brokers:
            try:
                self.spool.accept(
                    message_id, channel, message, [b.name for b in brokers]
                )
            except SpoolError as error:
                raise ProtocolError(
                    ErrorCode.BUSY, f"{error}; the message was not accepted"
                ) from None
        pending: Pending | None = None
        on_settled = None
        if wait and brokers:
            pending = Pending()
            outcomes = {"acked": 0, "dead": 0}
            expected = len(brokers)

            def on_settled(outcome: str) -> None:
                outcomes[outcome] += 1
                if outcomes["acked"] + outcomes["dead"] == expected:
                    pending.resolve(outcomes)

        for broker in brokers:
            broker.accept(Delivery(message_id, channel, message, on_settled))
        return len(brokers), pending

    def settled(self, broker: Broker, delivery: Delivery, outcome: str) -> None:
        """``broker`` is done with ``delivery`` ("acked" or "dead")."""
        if self.spool is not None:
            self.spool.settle(delivery.id, broker.name)
        delivery.settle(outcome)

    def publish_from_worker(self, instance: Instance, frame: dict[str, Any]) -> None:
        """A worker published on a busd channel (a Bank that is a broker)."""
        channel = frame.get("channel")
        if not isinstance(channel, str) or not channel:
            log.warning("%s: publish without a channel name ignored", instance)
            return
        try:
            self.daemon.route(channel, frame.get("message"))
        except ProtocolError as error:
            log.error("%s: its publish on %r was refused: %s", instance, channel, error)

    def publish_dead(self, broker: Broker, delivery: Delivery, error: str) -> None:
        """Send a message that failed too often to the ``dead`` channel."""
        letter = {
            "broker": broker.name,
            "id": delivery.id,
            "channel": delivery.channel,
            "message": delivery.message,
            "attempts": delivery.attempts,
            "errors": delivery.errors,
        }
        try:
            self.daemon.route(DEAD_CHANNEL, letter)
        except ProtocolError as refusal:
            log.error(
                "Dead letter %d could not be queued (%s); it stays in this log: %r",
                delivery.id,
                refusal.message,
                letter,
            )

    # -- how workers are run --------------------------------------------------------

    def spawner(self) -> Spawner:
        """The fork server that starts the workers; started if need be.

        ``busd run`` starts it before its own imports, to save time. Before
        any worker, it takes busd's credentials and umask, which are final
        once the privilege drop is done (this runs after it). If it died,
        a new one is started here, with busd's credentials from the start.
        """
        if self._spawner is None or self._spawner.gone:
            self._spawner = Spawner.launch(server_environment(self.identity))
        if not self._spawner.became:
            self._spawner.become(
                os.getuid(), os.getgid(), os.getgroups(), current_umask()
            )
        return self._spawner

    def broker_cwd(self, config: BrokerConfig) -> str:
        """The broker's working directory; relative to the config file's."""
        base = os.path.dirname(self.daemon.config_path or "") or os.getcwd()
        return os.path.normpath(os.path.join(base, config.cwd)) if config.cwd else base

    def process_owner(self, config: BrokerConfig) -> tuple[int, int, list[int]] | None:
        """The broker's own user for its workers: uid, gid, groups; or None."""
        if config.user == "" or os.geteuid() != 0:
            return None
        entry = (
            pwd.getpwuid(config.user)
            if isinstance(config.user, int)
            else pwd.getpwnam(config.user)
        )
        # As initgroups(3) does: the primary group among the supplementary ones.
        groups = [entry.pw_gid] + [
            g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem
        ]
        return entry.pw_uid, entry.pw_gid, groups

    # -- reporting ------------------------------------------------------------------

    def fork_server_pid(self) -> int | None:
        """The fork server's PID while it runs (``busctl state``)."""
        if self._spawner is None or self._spawner.gone:
            return None
        return self._spawner.pid

    def describe(self) -> dict[str, Any]:
        """Every broker's row for ``busctl state``."""
        return {name: broker.describe() for name, broker in self.brokers.items()}

    def describe_instance(self, instance: Instance) -> dict[str, Any]:
        """One instance's figures: state, PID, uptime, psutil usage, counters."""
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
    import dataclasses

    return dataclasses.replace(old, instances=new.instances) == new
