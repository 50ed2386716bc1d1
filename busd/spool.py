"""The spool: accepted messages on disk until every broker has settled them.

With ``[busd] spool`` set, busd appends a record for each accepted message
*before* ``publish`` answers, and a record each time a broker settles one
(acked, or given up on and sent to ``dead``). A busd killed with -9 finds
at its next start every message some broker had not settled, and delivers
it again (flagged ``redelivered``: it may have been handled once already).

The file is a sequence of frames in the wire format (4-byte length, then a
msgpack map)::

    {"a": id, "c": channel, "m": message, "b": [broker, ...]}   accepted
    {"s": id, "b": broker}                                       settled
    {"last": id}           the highest id so far (first record after a rewrite)

The file is read and written by the rules of busd/recordfile.py (shared
with the dead letters): a torn last frame (busd died mid-write) is
ignored; a damaged file does not stop busd: a record that is not one of
ours is skipped, a header no record can have ends the reading there, what
came before is delivered, and the file as it was is copied aside
(``busd.spool.damaged-TIME``) before the compaction at start rewrites it.
When the file holds mostly settled records it is rewritten with the live
ones only (a new file, fsynced, renamed over the old: a crash leaves one
or the other).

A message given up on (``dead``) leaves the spool once the dead-letter
store (busd/deadletters.py, a file of its own beside this one) holds it.

``fsync`` decides what a crash of the *machine* may lose: ``always``
fsyncs every write (nothing), ``interval`` at most every
``FSYNC_INTERVAL`` seconds (the last moments), ``never`` leaves it to the
kernel. A busd crash alone loses nothing in any mode: the data is in the
page cache once ``write`` returned.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from busd.protocol import encode_frame
from busd.recordfile import read_records, replace, write_all

log = logging.getLogger("busd")

SPOOL_FILE = "busd.spool"
FSYNC_MODES = ("always", "interval", "never")
FSYNC_INTERVAL = 0.05
# Rewrite the file once it is this large and mostly settled records.
COMPACT_BYTES = 4 << 20


class SpoolError(OSError):
    """The spool could not record a message (e.g. the disk is full)."""


@dataclass
class Pending:
    """A spooled message that some brokers have not settled yet."""

    id: int
    channel: str
    message: Any
    brokers: set[str] = field(default_factory=set)


class Spool:
    """An append-only record of accepted and settled messages."""

    def __init__(self, directory: str, fsync: str = "always") -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"spool fsync must be one of {FSYNC_MODES}, got {fsync!r}")
        self.directory = directory
        self.path = os.path.join(directory, SPOOL_FILE)
        self.fsync = fsync
        self.pending: dict[int, Pending] = {}
        self.last_id = 0
        self._settled_records = 0
        self._last_sync = 0.0
        # The file open for appending; None while loading, and once closed.
        self._fd: int | None = None
        os.makedirs(directory, mode=0o750, exist_ok=True)
        self._load()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    # -- reading at start -------------------------------------------------------

    def _load(self) -> None:
        read_records(self.path, "Spool", self._apply)
        if self.pending:
            log.info(
                "Spool %s: %d messages to deliver again", self.path, len(self.pending)
            )
        # Start from a compact file: only what is still pending.
        self._compact()

    def _apply(self, record: dict[str, Any]) -> None:
        """Take one record read at start; ValueError if it is not one of ours."""
        if _is_id(record.get("last")):
            self.last_id = max(self.last_id, record["last"])
        elif (
            _is_id(record.get("a"))
            and isinstance(record.get("c"), str)
            and "m" in record
            and isinstance(record.get("b"), list)
            and all(isinstance(b, str) for b in record["b"])
        ):
            self.pending[record["a"]] = Pending(
                record["a"], record["c"], record["m"], set(record["b"])
            )
            self.last_id = max(self.last_id, record["a"])
        elif _is_id(record.get("s")) and isinstance(record.get("b"), str):
            entry = self.pending.get(record["s"])
            if entry is not None:
                entry.brokers.discard(record["b"])
                if not entry.brokers:
                    del self.pending[record["s"]]
            self._settled_records += 1
        else:
            keys = sorted(map(str, record))[:5]
            raise ValueError(f"not a spool record (keys {keys})")

    # -- writing -------------------------------------------------------------------

    def accept(
        self, message_id: int, channel: str, message: Any, brokers: list[str]
    ) -> None:
        """Record an accepted message; raise SpoolError if it can't be."""
        self._append(
            encode_frame({"a": message_id, "c": channel, "m": message, "b": brokers})
        )
        self.pending[message_id] = Pending(message_id, channel, message, set(brokers))
        self.last_id = max(self.last_id, message_id)

    def settle(self, message_id: int, broker: str) -> None:
        """Record that ``broker`` is done with a message (acked or dead)."""
        entry = self.pending.get(message_id)
        if entry is None or broker not in entry.brokers:
            return
        try:
            self._append(encode_frame({"s": message_id, "b": broker}))
        except SpoolError as error:
            # Not fatal: the message will only be delivered once more.
            log.error(
                "Spool: cannot record that message %d is done: %s", message_id, error
            )
            return
        entry.brokers.discard(broker)
        if not entry.brokers:
            del self.pending[message_id]
        self._settled_records += 1
        if (
            self._settled_records > 2 * len(self.pending)
            and self._fd is not None
            and os.fstat(self._fd).st_size > COMPACT_BYTES
        ):
            self._compact()

    def _compact(self) -> None:
        """Rewrite the file with the pending messages only, if the disk lets us;
        otherwise keep appending."""
        # Settled records go, but message ids must not start over.
        frames = [encode_frame({"last": self.last_id})]
        frames += [
            encode_frame(
                {"a": e.id, "c": e.channel, "m": e.message, "b": sorted(e.brokers)}
            )
            for e in self.pending.values()
        ]
        if not replace(self.path, frames, "Spool"):
            return
        self._settled_records = 0
        if self._fd is not None:  # None while _load() compacts
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND, 0o640)

    def _append(self, data: bytes) -> None:
        if self._fd is None:
            raise SpoolError(f"the spool {self.path} is closed")
        try:
            write_all(self._fd, data)
            if self.fsync == "always" or (
                self.fsync == "interval"
                and time.monotonic() - self._last_sync > FSYNC_INTERVAL
            ):
                os.fsync(self._fd)
                self._last_sync = time.monotonic()
        except OSError as error:
            raise SpoolError(
                f"cannot write the spool {self.path}: {error.strerror or error}"
            ) from None

    def close(self) -> None:
        """Flush and close the file."""
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
