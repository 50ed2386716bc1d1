"""The ``busd`` command: run the daemon, start, stop or restart it detached,
check a config.

Exit statuses follow sysexits.h: 0 ok, 64 usage, 69 unavailable (busd
started but never answered), 70 internal error (a start step failed), 75
try again (``run``: a busd already runs there; ``start``, ``stop``: a busd
still runs after the wait), 77 not allowed to stop it, 78 configuration
error.
"""

from __future__ import annotations

import argparse
import os
import sys

from busd._version import __version__

TYPE_CHECKING = False
if TYPE_CHECKING:
    from busd.spawner import Spawner

EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_CONFIG = 78

DESCRIPTION = """\
busd runs a process bus as a daemon: it owns the PID file and the control
socket, drops privileges, and supervises broker processes. Talk to it with
busctl.
"""

EPILOG = """\
examples:
  busd run --config /etc/busd/busd.toml     foreground (systemd, containers)
  busd start --socket /tmp/busd.sock --pidfile /tmp/busd.pid
  busd stop --socket /tmp/busd.sock --pidfile /tmp/busd.pid
  busd restart --config /etc/busd/busd.toml --socket /tmp/busd.sock
  busd check-config --config /etc/busd/busd.toml

exit status: 0 ok (start: also when busd runs already; stop: also when
nothing runs), 64 usage, 69 busd did not answer, 70 a start step failed,
75 try again (run: a busd already runs there; start, stop: one still runs
after the wait), 77 not allowed to stop it, 78 broken configuration.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, shared by ``main`` and the docs."""
    parser = argparse.ArgumentParser(
        prog="busd",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"busd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--config",
            metavar="PATH",
            help="TOML config file (default: /etc/busd/busd.toml; all defaults "
            "when that file does not exist)",
        )
        return sub

    for name, help_text in (
        ("run", "run the daemon in the foreground (what systemd uses)"),
        (
            "start",
            "start the daemon in the background; return once it has started "
            "(a busd that is stopping there is waited for first)",
        ),
        (
            "stop",
            "stop the daemon running on the socket and PID file (as `busd "
            "start` started it); return once its process is gone",
        ),
        ("restart", "stop the daemon if it runs, then start it"),
    ):
        sub = add(name, help_text)
        sub.add_argument("--socket", metavar="PATH", help="control socket path")
        sub.add_argument("--pidfile", metavar="PATH", help="PID file path")
        if name == "stop":
            continue
        sub.add_argument(
            "--log-level",
            choices=("debug", "info", "warning", "error"),
            help="log level (default: from the config, else info)",
        )
    for name in ("start", "restart"):
        sub = commands.choices[name]
        sub.add_argument(
            "--log-file",
            metavar="PATH",
            help="where the detached daemon writes its log (default: busd.log "
            "beside the PID file)",
        )
        sub.add_argument(
            "--wait",
            type=_seconds,
            default=10.0,
            metavar="SECONDS",
            help="how long to wait for the daemon to have started (default: 10)",
        )
    stop_wait = (
        "how long to wait for the daemon to exit (default: the longest broker "
        "stop_timeout + 15)"
    )
    for name, option in (("stop", "--wait"), ("restart", "--stop-wait")):
        commands.choices[name].add_argument(
            option, dest="stop_wait", type=_seconds, metavar="SECONDS", help=stop_wait
        )
    run = commands.choices["run"]
    run.add_argument("--daemonize", action="store_true", help=argparse.SUPPRESS)
    run.add_argument("--log-file", help=argparse.SUPPRESS)
    add("check-config", "check a config file and exit (78 when it is broken)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``busd`` command."""
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.config)
    if args.command in ("start", "stop", "restart"):
        from busd import launcher

        command = {
            "start": launcher.start_detached,
            "stop": launcher.stop_daemon,
            "restart": launcher.restart_daemon,
        }[args.command]
        return command(args)
    return run(args)


def _seconds(text: str) -> float:
    """A number of seconds >= 0 (argparse's ``type``)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds >= 0, got {text!r}"
        )
    return value


def check_config(path: str | None) -> int:
    """Check the file at ``path`` and what it points at; 0 usable, 78 not.

    More than ``busd run`` refuses: the file must exist (busd would run on
    the defaults without it, which is not what a check is asked about);
    each broker's ``cwd`` and ``command`` must be usable (busd run only
    warns: the other brokers can run) and its handler must import
    (busd/checks.py). Every error is printed, one line each.
    """
    from busd.checks import handler_errors
    from busd.config import DEFAULT_PATH, ConfigError, load_config

    filename = path or DEFAULT_PATH
    try:
        config = load_config(filename)
    except ConfigError as error:
        hint = ""
        if path is None and not os.path.exists(filename):
            hint = (
                " (busd would run on the built-in defaults; name a file with --config)"
            )
        print(f"busd: {error}{hint}", file=sys.stderr)
        return EX_CONFIG
    from busd.checks import program_errors
    from busd.daemon import check_names

    errors = []
    try:
        check_names(config)
    except ValueError as error:
        errors.append(f"{filename}: {error}")
    base_dir = os.path.dirname(os.path.abspath(filename))
    errors += program_errors(config, base_dir) + handler_errors(config, base_dir)
    if errors:
        print("busd: " + "\n".join(errors), file=sys.stderr)
        return EX_CONFIG
    brokers = len(config.brokers)
    print(f"{path or DEFAULT_PATH}: OK ({brokers} broker{'s' * (brokers != 1)})")
    return 0


def run(args: argparse.Namespace) -> int:
    """``busd run``: load the config, build the daemon, serve until told to stop."""
    # busd serves a Unix socket only. asyncio imports ssl when it can, which
    # maps OpenSSL into the process for nothing (about 4 MiB of RSS, measured
    # in bench/control.py); marking ssl as absent makes asyncio skip it.
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
    from busd.control.activation import ActivationError, take_control_socket

    # Before the fork server starts: it and the workers must not inherit
    # systemd's LISTEN_* variables (busd/control/activation.py).
    try:
        control_socket = take_control_socket()
    except ActivationError as error:
        print(f"busd: {error}", file=sys.stderr)
        return EX_CONFIG
    # Daemonized, the fork server would be left behind by the fork; the
    # supervisor starts it after that.
    spawner = None if args.daemonize else launch_fork_server_early(args)
    from busd.config import DEFAULT_PATH, ConfigError, Overrides, load_config

    overrides = Overrides(
        socket=args.socket, pidfile=args.pidfile, log_level=args.log_level
    )
    config_path = os.path.abspath(args.config) if args.config else None
    try:
        config = overrides.apply(load_config(config_path))
        # Socket-activated, the socket is systemd's and nobody serves it
        # yet: a hello would only wait. systemd starts one busd per socket.
        refusal = _already_running(
            config.busd.socket, config.busd.pidfile, control_socket is None
        )
        if refusal:
            _let_go(spawner)
            print(f"busd: {refusal}", file=sys.stderr)
            return EX_TEMPFAIL
        if spawner is not None and (
            not config.brokers or spawner.mark != config.busd.socket
        ):
            # The peek guessed wrong: the supervisor starts the right one.
            _let_go(spawner)
            spawner = None
        from busd.daemon import Daemon, check_names

        check_names(config)
        daemon = Daemon(
            config,
            config_path=config_path,
            overrides=overrides,
            spawner=spawner,
            control_socket=control_socket,
        )
    except (ConfigError, ValueError) as error:
        _let_go(spawner)
        where = (
            "" if isinstance(error, ConfigError) else f"{config_path or DEFAULT_PATH}: "
        )
        print(f"busd: {where}{error}", file=sys.stderr)
        return EX_CONFIG
    if args.daemonize:
        from busd.plugins.daemonize import Daemonizer

        # Not the library's CherryPy defaults: busd leaves the directory it
        # was started in (so that it does not hold a mount busy), keeps a
        # umask that gives no one else write access, and closes what its
        # launcher passed down, which its brokers must not inherit.
        Daemonizer(
            daemon.bus,
            stdout=args.log_file,
            stderr=args.log_file,
            working_directory="/",
            umask=0o022,
            close_inherited=True,
        ).subscribe()
    return daemon.run()


def _already_running(socket_path: str, pidfile: str, ask_socket: bool) -> str:
    """Why this busd must not start beside another one there; "" if it may.

    Checked before anything is built, so that the answer is one line. (Two
    started at the same instant can both pass; the PID file's lock still
    stops the second, with the start step's traceback.) ``ask_socket``
    False: look at the PID file only.
    """
    from busd.probe import find

    running = find(socket_path, pidfile, ask_socket=ask_socket)
    if running is None:
        return ""
    answer = running.answer
    if answer is not None and answer.stopping:
        return (
            f"busd is still stopping there: {running.describe()}; try again once "
            "it has exited (busd start waits for that)"
        )
    return (
        f"already running: {running.describe()}; stop it first (busd stop), or "
        "give this one another socket and PID file"
    )


def launch_fork_server_early(args: argparse.Namespace) -> Spawner | None:
    """Start the fork server before the daemon's imports, if brokers are due.

    Its interpreter then starts beside this one, and the workers are ready
    sooner (busd/spawner.py). It needs busd's socket path (the orphan mark
    its workers carry), which is why the file is peeked at here with
    tomllib alone, before busd.config is even imported; ``run()`` checks
    the guess against the loaded config. None when the peek finds no
    broker, or cannot tell: then the supervisor starts the server when it
    starts the brokers.
    """
    import tomllib

    # The same defaults as busd.config (a wrong guess costs time only).
    try:
        with open(args.config or "/etc/busd/busd.toml", "rb") as file:
            data = tomllib.load(file)
    except (OSError, ValueError):
        return None  # load_config() will say what is wrong
    settings = data.get("busd", {})
    socket_path = (
        os.path.abspath(args.socket)
        if args.socket
        else settings.get("socket", "/run/busd/busd.sock")
        if isinstance(settings, dict)
        else None
    )
    if not data.get("brokers") or not isinstance(socket_path, str):
        return None
    from busd.spawner import Spawner, server_environment

    return Spawner.launch(server_environment(socket_path))


def _let_go(spawner: Spawner | None) -> None:
    """End a fork server that will not be used (None: nothing to do)."""
    if spawner is not None:
        spawner.close()
        spawner.wait_closed()


if __name__ == "__main__":
    sys.exit(main())
