"""One busd process: its bus and plugins, wired in the start order.

``Daemon`` builds each part once, gives each what it needs, and subscribes
the plugins in the start order of docs/architecture.md; each step is a bus
``start`` listener, in priority order::

    65 Daemonizer      (busd start only: detach)
    70 PIDFile         take the PID file
    74 IOLoop          the busd-io thread and its event loop
    75 ControlServer   bind the control socket (still root)
    77 DropPrivileges  user, groups, umask
    79 (spool)         open the spool, as busd's final user
    80 Supervisor      start the brokers
    85 (ready)         log "ready"
    90 SdNotify        READY=1 to systemd

Ownership points one way: the daemon makes the router, the supervisor, the
control server, the report and the ops, and hands each the others it
needs (as callables where one only calls); none of them knows the daemon.

The main thread runs ``bus.block()``: every state change (start, graceful,
exit) happens there. Signals and the ``reload``/``shutdown`` ops only leave
a request that the next ``main`` tick carries out.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections.abc import Callable

from busd._version import __version__
from busd.bus import Bus, states
from busd.checks import program_errors
from busd.config import Config, ConfigError, Overrides, load_config
from busd.control.access import AccessPolicy, access_policy
from busd.control.activation import InheritedSocket
from busd.control.server import ControlServer
from busd.control.settings import server_settings
from busd.deadletters import DeadLetters
from busd.events import EventHub
from busd.ioloop import IOLoop
from busd.logs import LogRing, bus_log_listener, setup_logging
from busd.ops import OpServices, build_ops
from busd.plugins.pidfile import PIDFile
from busd.plugins.privileges import DropPrivileges
from busd.plugins.sdnotify import SdNotify
from busd.plugins.signals import SignalHandler
from busd.principals import identity_of
from busd.report import Report
from busd.router import Router
from busd.spawner import Spawner
from busd.spool import Spool
from busd.supervision.launch import WorkerLauncher
from busd.supervision.supervisor import Supervisor, SupervisorLinks

log = logging.getLogger("busd")

# After the privilege drop (77), before the brokers (80): the spool's file
# is busd's own, and its messages are queued before any worker starts.
SPOOL_OPEN_PRIORITY = 79
# After the supervisor stopped the workers (60): no settlement comes later.
SPOOL_CLOSE_PRIORITY = 61
# After the supervisor (80), before READY (90).
READY_LOG_PRIORITY = 85
# First of the stop steps: a message accepted once busd is stopping could
# reach the router after the spool is closed (61) and before the socket is
# (90), and be lost; refused, its publisher knows to send it again.
REFUSE_PUBLISH_PRIORITY = 1


class Daemon:
    """The busd process: build it from a config, then ``run()`` it."""

    def __init__(
        self,
        config: Config,
        config_path: str | None = None,
        overrides: Overrides | None = None,
        spawner: Spawner | None = None,
        control_socket: InheritedSocket | None = None,
    ) -> None:
        """``spawner``: the fork server, if started already (busd/spawner.py).
        ``control_socket``: the listening socket systemd passed, served
        instead of binding ``[busd] socket`` (busd/control/activation.py)."""
        self.config_path = config_path
        self.overrides = overrides or Overrides()
        self.config = config
        settings = config.busd
        self.bus = Bus()
        self.ring = LogRing()
        self.logger = setup_logging(settings.log_level, ring=self.ring)
        self.bus.subscribe("log", bus_log_listener(self.logger))
        self._requests: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._exit_requested = False

        self.events = EventHub()
        self.router = Router(
            strict_channels=settings.strict_channels,
            dead_letters=DeadLetters(settings.max_dead_letters),
        )
        self.ioloop = IOLoop(self.bus)
        self.launcher = WorkerLauncher(
            settings.socket,
            os.path.dirname(config_path) if config_path else None,
            spawner,
        )
        self.supervisor = Supervisor(
            self.bus,
            config,
            SupervisorLinks(
                ioloop=self.ioloop,
                launcher=self.launcher,
                settle=self.router.settle,
                publish=self.router.publish_from_worker,
                set_routes=self.router.set_routes,
                emit=self.events.emit,
            ),
        )
        self.report = Report(
            self.bus,
            self.router,
            self.supervisor,
            self.launcher,
            clients=lambda: self.control.clients,
            config_path=config_path,
            # The path clients reach: systemd's, when it passed the socket.
            socket_path=control_socket.path if control_socket else settings.socket,
        )
        self.ops = build_ops(
            OpServices(
                router=self.router,
                supervisor=self.supervisor,
                report=self.report,
                events=self.events,
                ring=self.ring,
                ioloop=self.ioloop,
                bus_state=lambda: self.bus.state.name,
                stopping=self.stopping,
                check_reload=self.read_config,
                request_main_thread=self.request_main_thread,
            )
        )
        self.control = ControlServer(
            self.bus,
            self.ioloop,
            server_settings(config),
            self.ops,
            access_policy(config),
            inherited=control_socket,
        )
        self.signals = SignalHandler(self.bus)
        # busd's own choices, set here rather than as the library's defaults
        # (which are CherryPy's: SIGHUP exits or re-executes, SIGINT is a
        # KeyboardInterrupt): SIGHUP reloads the configuration, as
        # `systemctl reload` expects, and Ctrl-C is handled like SIGTERM, on
        # the main tick, never as an exception in the middle of a transition.
        self.signals.handlers = {
            "SIGTERM": self.bus.exit,
            "SIGINT": self.bus.exit,
            "SIGHUP": self.bus.graceful,
            "SIGUSR1": self.bus.graceful,
        }
        self.pidfile = PIDFile(self.bus, settings.pidfile)
        self.privileges = DropPrivileges(
            self.bus, user=settings.user or None, umask=settings.umask
        )
        self.notify = SdNotify(self.bus, unset_environment=True)
        for plugin in (
            self.signals,
            self.pidfile,
            self.ioloop,
            self.control,
            self.privileges,
            self.supervisor,
            self.notify,
        ):
            plugin.subscribe()
        self.bus.subscribe("start", self._open_spool, priority=SPOOL_OPEN_PRIORITY)
        self.bus.subscribe(
            "stop", self.router.close_spool, priority=SPOOL_CLOSE_PRIORITY
        )
        self.bus.subscribe("start", self._started, priority=READY_LOG_PRIORITY)
        self.bus.subscribe(
            "stop", self._refuse_publishes, priority=REFUSE_PUBLISH_PRIORITY
        )
        self.bus.subscribe("main", self._carry_out_requests)
        self.bus.subscribe("graceful", self._reload)
        self.bus.subscribe("state", self._announce_state)

    # -- life --------------------------------------------------------------

    def run(self) -> int:
        """Start the bus and serve until asked to exit; return the exit status."""
        self._warn_about_programs(self.config)
        self.bus.start()
        self.bus.block()
        return 0

    def _warn_about_programs(self, config: Config) -> None:
        """Log each broker whose ``cwd`` or ``command`` cannot work.

        A warning, not a refusal: the other brokers run, and these fail at
        their start with the state and log saying so; the directory or the
        program may yet appear. ``busd check-config`` calls them errors.
        """
        base_dir = os.path.dirname(self.config_path) if self.config_path else None
        for problem in program_errors(config, base_dir):
            log.warning("%s; its instances cannot start", problem)

    def _open_spool(self) -> None:
        settings = self.config.busd
        if settings.spool:
            # Opened here, after the PID file is ours: no other busd reads it.
            self.router.use_spool(Spool(settings.spool, settings.spool_fsync))
            # Its dead letters beside it: kept across restarts too.
            self.router.use_dead_letters(
                DeadLetters(settings.max_dead_letters, settings.spool)
            )

    def _started(self) -> None:
        self.report.mark_started()
        log.info(
            "busd %s ready on %s (PID %d)",
            __version__,
            self.control.path,
            os.getpid(),
        )

    def _refuse_publishes(self) -> None:
        """From now on the router refuses every message: busd is stopping."""
        reason = "busd is stopping"
        if self.ioloop.running:
            # The router lives on the I/O loop; once this has run there, no
            # publish handled later can be accepted.
            self.ioloop.run(_call(self.router.refuse_publishes, reason))
        else:
            self.router.refuse_publishes(reason)

    def stopping(self) -> bool:
        """Whether an exit was requested (``shutdown``) or has begun."""
        return self._exit_requested or self.bus.state in (
            states.STOPPING,
            states.EXITING,
        )

    def request_main_thread(self, action: str, reason: str) -> None:
        """Ask the main thread to ``exit`` or ``graceful`` at its next tick."""
        if action == "exit":
            self._exit_requested = True
        self._requests.put((action, reason))
        self.bus.wake()  # the tick comes at once, not up to 0.1 s later

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
        self.control.apply(
            self.control.settings._replace(
                max_frame=new.busd.max_frame,
                max_clients=new.busd.max_clients,
                frame_timeout=new.busd.frame_timeout,
                max_output=new.busd.max_output,
            ),
            policy,
        )
        self.config = new
        self._warn_about_programs(new)
        self.ioloop.call_soon(
            setattr, self.router, "strict_channels", new.busd.strict_channels
        )
        self.ioloop.call_soon(
            self.router.dead_letters.set_limit, new.busd.max_dead_letters
        )
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
        self.ioloop.call_soon(self.events.emit, event)


async def _call(function: Callable[[str], None], argument: str) -> None:
    function(argument)


def check_names(config: Config) -> None:
    """Raise ValueError naming the key of any user or group that does not exist.

    The config parser checks only the syntax of names; this looks them up
    (busd/principals.py), so that ``busd check-config`` and a reload catch a
    typo before it bites.
    """
    server_settings(config)
    access_policy(config)
    if config.busd.user != "":
        identity_of(config.busd.user, "[busd] user")
    for name, broker in config.brokers.items():
        if broker.user != "":
            identity_of(broker.user, f"[brokers.{name}] user")
