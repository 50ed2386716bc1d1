"""Brokers with controlled behaviour, for the tests that run real brokers.

busd runs each as ``python -m busd.worker --handler brokers_for_tests:Class``
with the tests directory as the broker's ``cwd``. They are configured by
the ``env`` table of their ``[brokers.NAME]``:

- ``RECORD``: a file each delivery is appended to, one JSON line written
  with a single ``write()`` on an ``O_APPEND`` descriptor, so the lines of
  several instances never mix and survive a SIGKILL right after;
- ``CHANNELS``: the channels to listen on, comma-separated (``main``);
- ``SLEEP``: seconds :class:`Slow` (and :class:`SlowFailTimes`) take per
  message.

Every recorded line holds the message, the delivery's ``attempt`` and
``redelivered`` flag (``bus.delivery``, see busd/worker.py), the channel,
the instance number and the worker's PID.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

from busd.plugins.base import SimplePlugin


def record(event: dict[str, Any]) -> None:
    """Append ``event`` to ``$RECORD`` as one JSON line (if RECORD is set)."""
    path = os.environ.get("RECORD")
    if not path:
        return
    line = (json.dumps(event) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


class Recorder(SimplePlugin):
    """Records every delivery on its channels and acknowledges it."""

    def subscribe(self) -> None:
        super().subscribe()
        for channel in os.environ.get("CHANNELS", "main").split(","):
            self.bus.subscribe(channel, self.deliver_on(channel))

    def deliver_on(self, channel: str):
        def listener(message: Any) -> None:
            self.handle(channel, message)

        return listener

    def handle(self, channel: str, message: Any) -> None:
        delivery = self.bus.delivery or {}
        record(
            {
                "channel": channel,
                "message": message,
                "attempt": delivery.get("attempt"),
                "redelivered": delivery.get("redelivered"),
                "instance": int(os.environ.get("BUSD_INSTANCE", "-1")),
                "pid": os.getpid(),
            }
        )


class FailTimes(Recorder):
    """Fails the first ``message["fail"]`` attempts of a message, then acks.

    The count is busd's ``attempt`` of the delivery, so it holds whichever
    instance gets the retry.
    """

    def handle(self, channel: str, message: Any) -> None:
        super().handle(channel, message)
        attempt = (self.bus.delivery or {}).get("attempt", 1)
        if attempt <= message.get("fail", 0):
            raise RuntimeError(f"planned failure {attempt} of {message['fail']}")


class SlowFailTimes(Recorder):
    """Records a delivery when it takes it in hand, works ``$SLEEP`` seconds
    on it, then fails it as :class:`FailTimes` does (``message["fail"]``).

    A record so means "in hand", not "done": a worker killed mid-message
    has recorded it, and busd has not settled it.
    """

    def handle(self, channel: str, message: Any) -> None:
        super().handle(channel, message)
        time.sleep(float(os.environ.get("SLEEP", "0.1")))
        attempt = (self.bus.delivery or {}).get("attempt", 1)
        if attempt <= message.get("fail", 0):
            raise RuntimeError(f"planned failure {attempt} of {message['fail']}")


class Slow(Recorder):
    """Takes ``$SLEEP`` seconds per message (a worker that lags behind)."""

    def handle(self, channel: str, message: Any) -> None:
        time.sleep(float(os.environ.get("SLEEP", "0.2")))
        super().handle(channel, message)


class CrashAtStart(SimplePlugin):
    """Exits with status 3 while being built: the worker never gets ready."""

    def __init__(self, bus: Any) -> None:
        super().__init__(bus)
        os._exit(3)


class Exiter(Recorder):
    """Ends its process with ``message["exit"]`` as status, at first delivery.

    A redelivered message (its instance died with it in hand) is only
    recorded, so a restarted worker is not taken down by the same message.
    """

    def handle(self, channel: str, message: Any) -> None:
        super().handle(channel, message)
        if not (self.bus.delivery or {}).get("redelivered"):
            sys.stderr.flush()
            os._exit(int(message["exit"]))


class Upstream(Recorder):
    """Publishes every message it gets again on busd's ``echo`` channel."""

    def handle(self, channel: str, message: Any) -> None:
        super().handle(channel, message)
        self.bus.publish_upstream("echo", {"echo": message})


class Stubborn(Recorder):
    """Ignores SIGTERM and hangs in its ``stop`` listener: only SIGKILL ends it.

    SIGTERM is ignored from the ``start`` listener, because the worker sets
    its own handlers after building the broker and before starting the bus.
    """

    def start(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        record({"event": "start", "pid": os.getpid()})

    def stop(self) -> None:
        record({"event": "stop", "pid": os.getpid()})
        threading.Event().wait()  # forever


class Flooder(Recorder):
    """On ``{"flood": N, "short": M}``, writes N lines of 1 MB to stderr.

    Between them go M short lines in all; then ``flood done``.
    """

    def handle(self, channel: str, message: Any) -> None:
        long_lines = int(message["flood"])
        short_lines = int(message.get("short", 0))
        long_line = b"x" * (1 << 20) + b"\n"
        per_gap = short_lines // max(long_lines, 1)
        gap = b"".join(b"short line %d\n" % i for i in range(per_gap))
        for _ in range(long_lines):
            os.write(2, long_line)
            os.write(2, gap)
        os.write(2, b"flood done\n")
        super().handle(channel, message)


class HangOn(Recorder):
    """Records, then never returns for a message equal to ``$HANG_ON``
    (a worker stuck on one message: busd's ack_timeout must notice)."""

    def handle(self, channel: str, message: Any) -> None:
        super().handle(channel, message)
        if message == os.environ.get("HANG_ON"):
            threading.Event().wait()


class FailUnlessFixed(Recorder):
    """Fails every delivery until its config says ``FIXED = "1"`` in ``env``
    (a handler that always raises, then fixed by a reload)."""

    def handle(self, channel: str, message: Any) -> None:
        super().handle(channel, message)
        if os.environ.get("FIXED") != "1":
            raise RuntimeError(f"cannot handle {message!r} yet")
