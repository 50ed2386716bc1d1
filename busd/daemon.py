"""One busd process: its bus, its plugins, and what the control ops act on.

``Daemon`` wires the pieces in the start order of docs/architecture.md;
each step is a bus ``start`` listener, in priority order::

    65 Daemonizer      (busd start only: detach)
    70 PIDFile         take the PID file
    75 ControlServer   bind the control socket (still root)
    77 DropPrivileges  user, groups, umask
    90 SdNotify        READY=1 to systemd

The main thread runs ``bus.block()``: every state change (start, graceful,
exit) happens there. Signals and the ``reload``/``shutdown`` ops only leave
a request that the next ``main`` tick carries out. Client I/O lives on the
control server's event loop thread; :class:`Hub` (channel subscribers and
event followers) is touched only from that loop.
"""

from __future__ import annotations

import dataclasses
import grp
import itertools
import logging
import os
import pwd
import queue
import time
from collections.abc import Callable
from typing import Any

from busd._version import __version__
from busd.bus import Bus, states
from busd.config import Config, ConfigError, Overrides, load_config
from busd.control import AccessPolicy, ControlServer, Pending, ServerSettings
from busd.logs import LogRing, bus_log_listener, setup_logging
from busd.ops import build_ops
from busd.plugins.pidfile import PIDFile
from busd.plugins.privileges import DropPrivileges
from busd.plugins.sdnotify import SdNotify
from busd.plugins.signals import SignalHandler
from busd.protocol import PROTOCOL_VERSION, ErrorCode, ProtocolError
from busd.spawner import Spawner
from busd.supervisor import Supervisor

log = logging.getLogger("busd")

EventFollower = Callable[[dict[str, Any]], None]
ChannelSubscriber = Callable[[str, Any], None]


class Hub:
    """Who listens to what on the control socket. Used on the I/O loop only."""

    def __init__(self) -> None:
        self.subscribers: dict[str, list[ChannelSubscriber]] = {}
        self.followers: list[EventFollower] = []

    def subscribe(self, channel: str, subscriber: ChannelSubscriber) -> None:
        """Send every message published on ``channel`` to ``subscriber``."""
        self.subscribers.setdefault(channel, []).append(subscriber)

    def unsubscribe(self, channel: str, subscriber: ChannelSubscriber) -> None:
        """Undo ``subscribe``."""
        listeners = self.subscribers.get(channel, [])
        if subscriber in listeners:
            listeners.remove(subscriber)
        if not listeners:
            self.subscribers.pop(channel, None)

    def deliver(self, channel: str, message: Any) -> int:
        """Hand ``message`` to the channel's subscribers; return how many."""
        listeners = self.subscribers.get(channel, ())
        for subscriber in list(listeners):
            subscriber(channel, message)
        return len(listeners)

    def follow_events(self, follower: EventFollower) -> None:
        """Send every event (state changes) to ``follower``."""
        self.followers.append(follower)

    def unfollow_events(self, follower: EventFollower) -> None:
        """Undo ``follow_events``."""
        if follower in self.followers:
            self.followers.remove(follower)

    def emit(self, event: dict[str, Any]) -> None:
        """Send ``event`` to every follower."""
        for follower in list(self.followers):
            follower(event)


class Daemon:
    """The busd process: build it from a config, then ``run()`` it."""

    def __init__(
        self,
        config: Config,
        config_path: str | None = None,
        overrides: Overrides | None = None,
        spawner: Spawner | None = None,
    ) -> None:
        """``spawner``: the fork server, if started already (busd/spawner.py)."""
        self.config_path = config_path
        self.overrides = overrides or Overrides()
        self.config = config
        self.bus = Bus()
        self.ring = LogRing()
        self.logger = setup_logging(config.busd.log_level, ring=self.ring)
        self.bus.subscribe("log", bus_log_listener(self.logger))
        self.hub = Hub()
        self.started_at: float | None = None
        self.published = 0
        self.unrouted = 0
        self._message_ids = itertools.count(1)
        self._requests: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self.ops = build_ops(self)

        settings = config.busd
        self.signals = SignalHandler(self.bus)
        self.pidfile = PIDFile(self.bus, settings.pidfile)
        self.control = ControlServer(
            self.bus, server_settings(config), self.ops, access_policy(config)
        )
        self.privileges = DropPrivileges(
            self.bus, user=settings.user or None, umask=settings.umask
        )
        self.notify = SdNotify(self.bus, unset_environment=True)
        self.supervisor = Supervisor(self.bus, self, spawner)
        for plugin in (
            self.signals,
            self.pidfile,
            self.control,
            self.privileges,
            self.supervisor,
            self.notify,
        ):
            plugin.subscribe()
        self.bus.subscribe("main", self._carry_out_requests)
        self.bus.subscribe("graceful", self._reload)
        self.bus.subscribe("state", self._announce_state)
        self.bus.subscribe("start", self._started, priority=85)

    # -- life --------------------------------------------------------------

    def run(self) -> int:
        """Start the bus and serve until asked to exit; return the exit status."""
        self.bus.start()
        self.bus.block()
        return 0

    def _started(self) -> None:
        self.started_at = time.time()
        log.info(
            "busd %s ready on %s (PID %d)",
            __version__,
            self.config.busd.socket,
            os.getpid(),
        )

    def continue_message_ids_after(self, last_id: int) -> None:
        """Number new messages after ``last_id`` (the spool's last one)."""
        self._message_ids = itertools.count(last_id + 1)

    def request_main_thread(self, action: str, reason: str) -> None:
        """Ask the main thread to ``exit`` or ``graceful`` at its next tick."""
        self._requests.put((action, reason))

    def _carry_out_requests(self) -> None:
        while True:
            try:
                action, reason = self._requests.get_nowait()
            except queue.Empty:
                return
            if self.bus.state is states.EXITING:
                continue
            log.info("%s %s", "Shutdown" if action == "exit" else "Reload", reason)
            getattr(self.bus, action)()

    def _reload(self) -> None:
        """Read the config file again and apply what can change while running.

        A broken file is refused with a log line; the running configuration
        stays as it was.
        """
        try:
            new, policy = self.read_config()
        except (ConfigError, ValueError) as error:
            log.error("Reload refused, keeping the running configuration: %s", error)
            return
        old = self.config
        for key in ("socket", "pidfile", "user", "group", "socket_mode"):
            if getattr(old.busd, key) != getattr(new.busd, key):
                log.warning(
                    "[busd] %s changed; it takes effect at the next restart", key
                )
        setup_logging(new.busd.log_level, ring=self.ring)
        self.control.policy = policy
        self.control.settings = dataclasses.replace(
            self.control.settings,
            max_frame=new.busd.max_frame,
            max_clients=new.busd.max_clients,
            frame_timeout=new.busd.frame_timeout,
            max_output=new.busd.max_output,
        )
        self.config = new
        self.supervisor.reconfigure(new)
        log.info("Reloaded configuration from %s", self.config_path or "defaults")

    def read_config(self) -> tuple[Config, AccessPolicy]:
        """The config file as a reload would apply it, and its access policy.

        Raises ConfigError or ValueError (an unknown user or group) saying
        what is wrong; nothing is applied here.
        """
        new = self.overrides.apply(load_config(self.config_path))
        check_names(new)
        return new, access_policy(new)

    def _announce_state(self, state: states) -> None:
        event = {"type": "bus", "state": state.name, "time": time.time()}
        self.control.call_soon(self.hub.emit, event)

    # -- what ops act on (called on the I/O loop) ---------------------------

    def route(
        self, channel: str, message: Any, wait: bool = False
    ) -> tuple[dict[str, Any], Pending | None]:
        """Accept ``message`` on ``channel``: queue it for every broker on the
        channel and hand it to the control clients subscribed to it.

        Returns the ``publish`` result and, with ``wait``, a Pending resolved
        with the brokers' acks. Raises ``busy`` (a broker's queue is full) or, with
        ``strict_channels``, ``unknown_channel``.
        """
        if self.config.busd.strict_channels and channel not in self.supervisor.routes:
            raise ProtocolError(
                ErrorCode.UNKNOWN_CHANNEL,
                f"no broker listens on channel {channel!r} (strict_channels is on)",
            )
        message_id = next(self._message_ids)
        brokers, acks = self.supervisor.publish(message_id, channel, message, wait)
        self.published += 1
        if brokers == 0:
            self.unrouted += 1
        subscribers = self.hub.deliver(channel, message)
        result = {"id": message_id, "brokers": brokers, "subscribers": subscribers}
        return result, acks

    def describe(self) -> dict[str, Any]:
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
            "socket": self.config.busd.socket,
            "uid": os.getuid(),
            "gid": os.getgid(),
            "process": usage,
            "fork_server": self.supervisor.fork_server_pid(),
            "clients": len(self.control.connections),
            "published": self.published,
            "unrouted": self.unrouted,
            "brokers": self.supervisor.describe(),
        }


def check_names(config: Config) -> None:
    """Raise ValueError naming the key of any user or group that does not exist.

    The config parser checks only the syntax of names; this looks them up,
    so that ``busd check-config`` and a reload catch a typo before it bites.
    """
    server_settings(config)
    access_policy(config)
    if config.busd.user != "":
        resolve_user(config.busd.user, "[busd] user")
    for name, broker in config.brokers.items():
        if broker.user != "":
            resolve_user(broker.user, f"[brokers.{name}] user")


def server_settings(config: Config) -> ServerSettings:
    """The control server's settings from ``config`` (group names resolved)."""
    settings = config.busd
    return ServerSettings(
        path=settings.socket,
        mode=settings.socket_mode,
        gid=resolve_group(settings.group, "[busd] group")
        if settings.group != ""
        else -1,
        max_frame=settings.max_frame,
        max_clients=settings.max_clients,
        frame_timeout=settings.frame_timeout,
        max_output=settings.max_output,
    )


def access_policy(config: Config) -> AccessPolicy:
    """The allow-lists of ``[access]`` with names resolved to ids."""
    access = config.access
    return AccessPolicy(
        read_uids=frozenset(
            resolve_user(u, "[access] read_users") for u in access.read_users
        ),
        read_gids=frozenset(
            resolve_group(g, "[access] read_groups") for g in access.read_groups
        ),
        write_uids=frozenset(
            resolve_user(u, "[access] write_users") for u in access.write_users
        ),
        write_gids=frozenset(
            resolve_group(g, "[access] write_groups") for g in access.write_groups
        ),
    )


def resolve_user(user: str | int, where: str) -> int:
    """A uid from a name or number; ValueError naming ``where`` if unknown."""
    if isinstance(user, int):
        return user
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ValueError(f"{where}: unknown user {user!r}") from None


def resolve_group(group: str | int, where: str) -> int:
    """A gid from a name or number; ValueError naming ``where`` if unknown."""
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"{where}: unknown group {group!r}") from None
