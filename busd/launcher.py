"""``busd start``, ``stop`` and ``restart``: a detached daemon, from outside.

``start`` launches ``busd run --daemonize`` with the same settings and
returns once the daemon answers as STARTED. The detached daemon cannot
print to this terminal, so it writes its log to a file (``--log-file``,
default ``busd.log`` beside the PID file); when it fails, this command
prints what the daemon wrote there since the launch: that is why.

``stop`` asks the daemon found on the socket and PID file to shut down
(SIGTERM when its socket does not answer) and returns once its process is
gone; ``restart`` is ``stop`` then ``start``. A busd on its way out is
never taken for a running one: ``start`` waits for it to be gone, then
starts a new one (busd/probe.py says how a daemon is found).

Exit statuses (sysexits.h, as busd/cli.py): 0 done (also: ``start`` when
busd runs already, ``stop`` when nothing runs, as LSB init scripts do), 69
the daemon did not answer, 75 a daemon still runs after the wait, 77 not
allowed to stop it, 78 configuration error, or the daemon's own status
when it failed to start.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from busd.config import Config, ConfigError, Overrides, load_config
from busd.probe import Refused, Running, call, find, hello, wait_gone

EX_SOFTWARE = 70
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

#: How long ``stop`` waits beyond the longest broker ``stop_timeout``: the
#: fork server, the spool and the socket close after the workers.
STOP_MARGIN = 15.0
#: How often a wait for something outside this process looks again.
POLL_INTERVAL = 0.05


def start_detached(args: argparse.Namespace) -> int:
    """``busd start``: launch ``busd run --daemonize``; wait until STARTED."""
    loaded = _load(args, to_start=True)
    if isinstance(loaded, int):
        return loaded
    config, config_path, overrides = loaded
    return _start(args, config, config_path, overrides)


def stop_daemon(args: argparse.Namespace) -> int:
    """``busd stop``: ask the daemon to shut down; wait until its PID is gone."""
    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    config = loaded[0]
    return _stop(config, _wait_seconds(args, config))


def restart_daemon(args: argparse.Namespace) -> int:
    """``busd restart``: ``stop`` (if something runs), then ``start``.

    A config the new daemon would refuse stops nothing.
    """
    loaded = _load(args, to_start=True)
    if isinstance(loaded, int):
        return loaded
    config, config_path, overrides = loaded
    status = _stop(config, _wait_seconds(args, config))
    if status != 0:
        return status
    return _start(args, config, config_path, overrides)


def stop_timeout(config: Config) -> float:
    """How long a busd with ``config`` may take to stop: its slowest broker's
    ``stop_timeout`` plus :data:`STOP_MARGIN`."""
    slowest = max((b.stop_timeout for b in config.brokers.values()), default=0.0)
    return slowest + STOP_MARGIN


# -- the steps ----------------------------------------------------------------------


def _load(
    args: argparse.Namespace, to_start: bool = False
) -> tuple[Config, str | None, Overrides] | int:
    """The config with the command line's overrides, or the exit status.

    ``to_start``: also look up its users and groups, as ``busd run`` will.
    """
    config_path = os.path.abspath(args.config) if args.config else None
    overrides = Overrides(
        socket=_absolute(args.socket),
        pidfile=_absolute(args.pidfile),
        log_level=getattr(args, "log_level", None),
    )
    try:
        config = overrides.apply(load_config(config_path))
    except ConfigError as error:
        print(f"busd: {error}", file=sys.stderr)
        return EX_CONFIG
    if to_start:
        from busd.daemon import check_names

        try:
            check_names(config)
        except ValueError as error:
            print(f"busd: {config.source}: {error}", file=sys.stderr)
            return EX_CONFIG
    return config, config_path, overrides


def _wait_seconds(args: argparse.Namespace, config: Config) -> float:
    given: float | None = getattr(args, "stop_wait", None)
    return stop_timeout(config) if given is None else given


def _start(
    args: argparse.Namespace,
    config: Config,
    config_path: str | None,
    overrides: Overrides,
) -> int:
    socket_path = config.busd.socket
    try:
        running = _running_or_gone(config, time.monotonic() + args.wait)
    except _StillThere:
        return EX_TEMPFAIL
    if running is not None:
        print(f"busd is already running: PID {running} on {socket_path}")
        return 0

    # The daemon logs these too, in a file this terminal does not show.
    from busd.checks import program_errors

    base_dir = os.path.dirname(config_path) if config_path else None
    for problem in program_errors(config, base_dir):
        print(f"busd: warning: {problem}; its instances cannot start", file=sys.stderr)

    log_file = _absolute(args.log_file) or os.path.join(
        os.path.dirname(config.busd.pidfile), "busd.log"
    )
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    log_offset = os.path.getsize(log_file) if os.path.exists(log_file) else 0
    command = [
        sys.executable,
        "-m",
        "busd",
        "run",
        "--daemonize",
        "--log-file",
        log_file,
    ]
    for option, value in (
        ("--config", config_path),
        ("--socket", overrides.socket),
        ("--pidfile", overrides.pidfile),
        ("--log-level", overrides.log_level),
    ):
        if value:
            command += [option, value]
    # The launched process exits as soon as the daemon has forked away; a
    # non-zero status means it failed before that. Its output goes to the
    # log file from the first line, so the reason is always in one place.
    with open(log_file, "a") as log:
        status = subprocess.run(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, check=False
        ).returncode
    if status != 0:
        print(
            f"busd: the daemon failed to start; its log {log_file} says:",
            file=sys.stderr,
        )
        _show_log(log_file, log_offset)
        return status

    # The daemon answers from its socket's bind on, while its brokers are
    # still starting: it has started once it says STARTED.
    deadline = time.monotonic() + args.wait
    answer = None
    while time.monotonic() < deadline:
        answer = hello(socket_path, timeout=1)
        if answer is not None and answer.stopping:
            print(
                f"busd: the daemon (PID {answer.pid}) is stopping instead of "
                f"starting; its log {log_file} says:",
                file=sys.stderr,
            )
            _show_log(log_file, log_offset)
            return EX_SOFTWARE
        if answer is not None and answer.state in ("STARTED", ""):
            print(
                f"busd started: PID {answer.pid}, socket {socket_path}, log {log_file}"
            )
            return 0
        time.sleep(POLL_INTERVAL)  # an outside process: no event to wait on
    if answer is None:
        print(
            f"busd: the daemon did not answer on {socket_path} within "
            f"{args.wait:g} s; its log {log_file} says:",
            file=sys.stderr,
        )
    else:
        print(
            f"busd: the daemon (PID {answer.pid}) was still {answer.state} on "
            f"{socket_path} after {args.wait:g} s; its log {log_file} says:",
            file=sys.stderr,
        )
    _show_log(log_file, log_offset)
    return EX_UNAVAILABLE


def _running_or_gone(config: Config, deadline: float) -> int | None:
    """The PID of a busd running on ``config``'s socket, or None once none is.

    A busd on its way out is waited for until ``deadline``; one that holds
    the PID file but does not answer is starting (or stopping after its
    socket closed): wait until it answers or is gone. Raises
    :class:`_StillThere`, after saying so, when one is there at the deadline.
    """
    said = False
    while True:
        running = find(config.busd.socket, config.busd.pidfile)
        if running is None:
            return None
        answer = running.answer
        if answer is not None and not answer.stopping:
            return answer.pid
        pid = running.pids[0]
        if not said:
            why = "it is stopping" if answer is not None else "it does not answer yet"
            print(f"busd: waiting for PID {pid} to exit ({why})", file=sys.stderr)
            said = True
        left = deadline - time.monotonic()
        if left <= 0:
            print(
                f"busd: {running.describe()} is still there; try again once it "
                "has exited",
                file=sys.stderr,
            )
            raise _StillThere
        wait_gone(pid, min(left, POLL_INTERVAL) if answer is None else left)


class _StillThere(Exception):
    """A busd still runs on the socket or PID file at the deadline."""


def _stop(config: Config, wait: float) -> int:
    """Stop the busd on ``config``'s socket and PID file; wait ``wait`` s."""
    running = find(config.busd.socket, config.busd.pidfile)
    if running is None:
        print(
            f"busd is not running: nothing answers on {config.busd.socket} and no "
            f"process holds {config.busd.pidfile}"
        )
        return 0
    status = _ask_to_stop(running)
    if status != 0:
        return status
    deadline = time.monotonic() + wait
    for pid in running.pids:
        if not wait_gone(pid, deadline - time.monotonic()):
            print(
                f"busd: PID {pid} still runs {wait:g} s after it was asked to stop "
                f"(--wait); busctl state shows what it waits for, kill -9 {pid} "
                "ends it",
                file=sys.stderr,
            )
            return EX_TEMPFAIL
    print(f"busd stopped: {running.describe()}")
    return 0


def _ask_to_stop(running: Running) -> int:
    """Ask the daemon on the socket to shut down, signal one that does not
    answer there; 0, or the exit status of a refusal."""
    answer = running.answer
    to_signal = running.pids
    if answer is not None:
        try:
            if not answer.stopping:
                call(running.socket_path, "shutdown", timeout=10)
        except Refused as refusal:
            print(f"busd: {refusal.message}", file=sys.stderr)
            return EX_NOPERM if refusal.code == "permission_denied" else 1
        except OSError:
            pass  # it stopped answering meanwhile: signalled below
        else:
            to_signal = [pid for pid in running.pids if pid != answer.pid]
    return _terminate(to_signal)


def _terminate(pids: list[int]) -> int:
    """SIGTERM each of ``pids`` (busd exits on it, as on ``shutdown``)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue  # gone already
        except PermissionError:
            print(
                f"busd: not allowed to signal PID {pid}: stop it as its user or "
                "as root",
                file=sys.stderr,
            )
            return EX_NOPERM
    return 0


# -- helpers ------------------------------------------------------------------------


def _show_log(log_file: str, offset: int) -> None:
    """What the daemon logged since ``offset``: why its start failed."""
    sys.stderr.write(_read_from(log_file, offset) or "(nothing)\n")


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


def _read_from(path: str, offset: int) -> str:
    try:
        with open(path, errors="replace") as file:
            file.seek(offset)
            return file.read()[-8000:]
    except OSError:
        return ""
