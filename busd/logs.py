"""Operator logs: one line per event on stderr, and a ring of recent lines.

Under systemd (``JOURNAL_STREAM`` set) each line starts with a syslog
priority like ``<4>`` and carries no timestamp: journald adds its own and
files the line at the right level. Elsewhere a line reads::

    2026-11-25 08:40:00,123 busd[4242] INFO Bus STARTED

Every line also lands in a :class:`LogRing`, which ``busctl logs`` reads
and follows.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["LOGGER_NAME", "LogRing", "bus_log_listener", "setup_logging"]

LOGGER_NAME = "busd"
DEFAULT_RING_LINES = 1000

# logging levels to syslog priorities, for journald's SyslogLevelPrefix.
_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    """``<priority>message``: journald supplies time, PID and unit."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
        return f"<{priority}>{super().format(record)}"


class LogRing(logging.Handler):
    """Keeps the last log entries of each source and tells followers of new ones.

    An entry is a dict ``{time, level, source, message}`` (a worker's also
    has ``instance`` and ``pid``), ready to be sent to a client. Each
    source (busd itself, each broker) has its own bounded ring, so a
    chatty broker cannot push busd's own lines out. Followers are called
    from whatever thread logged, so they must only hand the entry over
    (e.g. ``loop.call_soon_threadsafe``).
    """

    def __init__(self, capacity: int = DEFAULT_RING_LINES) -> None:
        super().__init__()
        self.capacity = capacity
        self._rings: dict[str, collections.deque[dict[str, Any]]] = {}
        self._followers: list[Callable[[dict[str, Any]], None]] = []
        self._ring_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        """Store the record's entry and pass it to each follower."""
        entry = {
            "time": record.created,
            "level": record.levelname.lower(),
            "source": getattr(record, "source", "busd"),
        }
        # A worker's line (see busd.supervision.supervisor) carries its own fields and
        # its bare text, without the "orders:0[PID]" prefix of busd's log.
        for key in ("instance", "pid"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        entry["message"] = (
            record.line if hasattr(record, "line") else record.getMessage()
        )
        self._store(entry)

    def _store(self, entry: dict[str, Any]) -> None:
        with self._ring_lock:
            ring = self._rings.get(entry["source"])
            if ring is None:
                ring = self._rings[entry["source"]] = collections.deque(
                    maxlen=self.capacity
                )
            ring.append(entry)
            followers = list(self._followers)
        for follower in followers:
            follower(entry)

    def recent(self, count: int, source: str | None = None) -> list[dict[str, Any]]:
        """The last ``count`` entries, oldest first, of one source or of all."""
        if count <= 0:
            return []
        with self._ring_lock:
            if source is not None:
                entries = list(self._rings.get(source, ()))
            else:
                entries = [e for ring in self._rings.values() for e in ring]
        if source is None:
            entries.sort(key=lambda e: e["time"])
        return entries[-count:]

    def follow(self, follower: Callable[[dict[str, Any]], None]) -> None:
        """Call ``follower(entry)`` for every entry from now on."""
        with self._ring_lock:
            self._followers.append(follower)

    def unfollow(self, follower: Callable[[dict[str, Any]], None]) -> None:
        """Stop calling ``follower``."""
        with self._ring_lock, contextlib.suppress(ValueError):
            self._followers.remove(follower)


def setup_logging(
    level: str | int = "info",
    stream: TextIO | None = None,
    ring: LogRing | None = None,
) -> logging.Logger:
    """Configure the ``busd`` logger for an operator; return it.

    The format depends on whether stderr goes to the journal. Calling it
    again (on reload) replaces the handlers instead of adding more.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    console = logging.StreamHandler(stream or sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        console.setFormatter(JournalFormatter("%(message)s"))
    else:
        console.setFormatter(
            logging.Formatter("%(asctime)s busd[%(process)d] %(levelname)s %(message)s")
        )
    logger.addHandler(console)
    if ring is not None:
        logger.addHandler(ring)
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    logger.propagate = False
    return logger


def bus_log_listener(logger: logging.Logger) -> Callable[[str, int], None]:
    """A ``log`` channel listener that writes the bus's messages to ``logger``."""

    def log(msg: str, level: int = logging.INFO) -> None:
        logger.log(level, msg)

    return log
