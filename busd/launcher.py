"""``busd start``: launch a detached daemon and return once it answers.

The detached daemon cannot print to this terminal, so it writes its log to
a file (``--log-file``, default ``busd.log`` beside the PID file). If it
does not answer ``ping`` in time, this command prints what the daemon
wrote to that file since the launch: that is why it did not start.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

EX_UNAVAILABLE = 69
EX_CONFIG = 78


def start_detached(args: argparse.Namespace) -> int:
    """Start ``busd run --daemonize`` with the same settings; wait for ping."""
    from busd.config import ConfigError, Overrides, load_config

    config_path = os.path.abspath(args.config) if args.config else None
    overrides = Overrides(
        socket=_absolute(args.socket),
        pidfile=_absolute(args.pidfile),
        log_level=args.log_level,
    )
    try:
        config = overrides.apply(load_config(config_path))
    except ConfigError as error:
        print(f"busd: {error}", file=sys.stderr)
        return EX_CONFIG
    socket_path = config.busd.socket
    pid = answering_pid(socket_path, timeout=2)
    if pid is not None:
        print(f"busd is already running: PID {pid} on {socket_path}")
        return 0

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
        sys.stderr.write(_read_from(log_file, log_offset) or "(nothing)\n")
        return status

    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        pid = answering_pid(socket_path, timeout=1)
        if pid is None:
            time.sleep(0.05)  # polling an outside process: no event to wait on
            continue
        print(f"busd started: PID {pid}, socket {socket_path}, log {log_file}")
        return 0
    print(
        f"busd: the daemon did not answer on {socket_path} within {args.wait:g} s; "
        f"its log {log_file} says:",
        file=sys.stderr,
    )
    sys.stderr.write(_read_from(log_file, log_offset) or "(nothing)\n")
    return EX_UNAVAILABLE


def answering_pid(socket_path: str, timeout: float) -> int | None:
    """The PID of the busd that answers ``hello`` on ``socket_path``, or None.

    One request on the wire protocol (busd/protocol.py), so that busd does
    not depend on its client package.
    """
    import socket

    from busd.protocol import FrameDecoder, ProtocolError, encode_frame

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(socket_path)
            sock.sendall(encode_frame({"id": 1, "op": "hello"}))
            decoder = FrameDecoder()
            while True:
                data = sock.recv(65536)
                if not data:
                    return None
                for answer in decoder.feed(data):
                    if isinstance(answer, dict) and answer.get("id") == 1:
                        result = answer.get("result")
                        pid = result.get("pid") if isinstance(result, dict) else None
                        return pid if isinstance(pid, int) else None
    except (OSError, ProtocolError):
        return None


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


def _read_from(path: str, offset: int) -> str:
    try:
        with open(path, errors="replace") as file:
            file.seek(offset)
            return file.read()[-8000:]
    except OSError:
        return ""
