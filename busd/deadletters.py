"""Dead letters: the messages brokers gave up on, kept until an operator acts.

A message is *dead* when a broker gives up on it: it failed
``max_retries + 1`` times, hung that many workers past ``ack_timeout``, or
its broker was removed from the config (by a reload, or before a restart
with the spool on) while holding it. The router hands
each one to this store (``add``), and it stays there until ``busctl dead
replay`` publishes it again or ``busctl dead drop`` removes it. Each
letter has an id of its own (a message that died in two brokers is two
letters), the message's id, channel and content, the broker, the number
of attempts, the errors (the last ``MAX_ERRORS``) and the time.

The store is bounded (``[busd] max_dead_letters``): a letter over the
bound drops the oldest. Drops are counted (``overflowed``), and logged
once per burst: the first at once, then one line per ``OVERFLOW_WINDOW``
seconds with how many more went, for as long as they keep going.

With a spool, the store is also a file beside it (``busd.dead``), so the
letters survive busd's restart and a kill -9. Its records are frames, as
the spool's, read and written by the rules of busd/recordfile.py (a torn
end ignored, damage skipped and the file copied aside)::

    {"d": id, "i": message id, "c": channel, "m": message, "b": broker,
     "n": attempts, "e": [error, ...], "t": time}                   a letter
    {"x": id}                                                   gone again
    {"last": id}           the highest id so far (first record after a rewrite)

Every record is fsynced: letters are rare, and the spool forgets a dead
message only once its letter is on disk (busd/router.py).

Used on busd's I/O loop only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from busd.protocol import encode_frame
from busd.recordfile import read_records, replace, write_all

log = logging.getLogger("busd")

DEAD_FILE = "busd.dead"
#: Letters kept when ``[busd] max_dead_letters`` is not set.
DEFAULT_LIMIT = 10000
#: The errors a letter keeps (the last ones: ``attempts`` says how many there
#: were), and the characters kept of each.
MAX_ERRORS = 20
MAX_ERROR_CHARS = 2000
#: Seconds of one overflow log window: the drops in it make one log line.
OVERFLOW_WINDOW = 10.0
#: The length of a letter's preview and of its last error in ``summary``.
PREVIEW_CHARS = 60
SUMMARY_ERROR_CHARS = 200
# Rewrite the file once it is this large and mostly removed letters.
COMPACT_BYTES = 4 << 20
LABEL = "Dead-letter file"

#: ``schedule(delay, callback)``: call ``callback`` after ``delay`` seconds.
Schedule = Callable[[float, Callable[[], None]], object]


@dataclass
class DeadLetter:
    """One message a broker gave up on."""

    id: int
    message_id: int
    channel: str
    message: Any
    broker: str
    attempts: int
    errors: list[str]
    when: float

    def record(self) -> dict[str, Any]:
        """The whole letter, as ``dead_show`` answers it."""
        return {
            "id": self.id,
            "message_id": self.message_id,
            "channel": self.channel,
            "message": self.message,
            "broker": self.broker,
            "attempts": self.attempts,
            "errors": list(self.errors),
            "when": self.when,
        }

    def summary(self) -> dict[str, Any]:
        """The letter in short, as ``dead_list`` answers it: a one-line
        ``preview`` of the message and the last ``error``, both cut short."""
        last = self.errors[-1] if self.errors else ""
        return {
            "id": self.id,
            "message_id": self.message_id,
            "channel": self.channel,
            "broker": self.broker,
            "attempts": self.attempts,
            "when": self.when,
            "error": _cut(last.replace("\n", " "), SUMMARY_ERROR_CHARS),
            "preview": preview(self.message),
        }


class DeadLetters:
    """The dead-letter store: in memory, bounded; with ``directory``, on disk too.

    ``schedule`` ends an overflow log window (default: the running asyncio
    loop's ``call_later``).
    """

    def __init__(
        self,
        limit: int = DEFAULT_LIMIT,
        directory: str | None = None,
        schedule: Schedule | None = None,
    ) -> None:
        self.limit = limit
        #: id -> letter, oldest first.
        self.letters: dict[int, DeadLetter] = {}
        self.last_id = 0
        #: Letters dropped to stay within ``limit``, since busd started.
        self.overflowed = 0
        self._schedule = schedule or _call_later
        # Drops of the open overflow window not logged yet; None: no window.
        self._unlogged: int | None = None
        self.path: str | None = None
        self._fd: int | None = None
        self._removed_records = 0
        if directory is not None:
            self.path = os.path.join(directory, DEAD_FILE)
            os.makedirs(directory, mode=0o750, exist_ok=True)
            self._load()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def __len__(self) -> int:
        return len(self.letters)

    # -- reading at start ------------------------------------------------------

    def _load(self) -> None:
        assert self.path is not None
        read_records(self.path, LABEL, self._apply)
        extra = len(self.letters) - self.limit
        if extra > 0:
            for letter_id in list(self.letters)[:extra]:
                del self.letters[letter_id]
            self.overflowed += extra
            log.error(
                "%s %s holds %d dead letters, over max_dead_letters (%d): "
                "the %d oldest are dropped",
                LABEL,
                self.path,
                self.limit + extra,
                self.limit,
                extra,
            )
        if self.letters:
            log.info(
                "%s %s: %d dead letters kept (`busctl dead list`)",
                LABEL,
                self.path,
                len(self.letters),
            )
        self._compact()

    def _apply(self, record: dict[str, Any]) -> None:
        """Take one record read at start; ValueError if it is not one of ours."""
        if _is_id(record.get("last")):
            self.last_id = max(self.last_id, record["last"])
        elif (
            _is_id(record.get("d"))
            and _is_id(record.get("i"))
            and isinstance(record.get("c"), str)
            and "m" in record
            and isinstance(record.get("b"), str)
            and _is_id(record.get("n"))
            and isinstance(record.get("e"), list)
            and all(isinstance(e, str) for e in record["e"])
            and isinstance(record.get("t"), int | float)
            and not isinstance(record.get("t"), bool)
        ):
            letter = DeadLetter(
                record["d"],
                record["i"],
                record["c"],
                record["m"],
                record["b"],
                record["n"],
                record["e"],
                float(record["t"]),
            )
            self.letters.pop(letter.id, None)
            self.letters[letter.id] = letter
            self.last_id = max(self.last_id, letter.id)
        elif _is_id(record.get("x")):
            self.letters.pop(record["x"], None)
            self._removed_records += 1
        else:
            keys = sorted(map(str, record))[:5]
            raise ValueError(f"not a dead-letter record (keys {keys})")

    # -- letters in and out ------------------------------------------------------

    def add(
        self,
        message_id: int,
        channel: str,
        message: Any,
        broker: str,
        attempts: int,
        errors: Iterable[str],
    ) -> tuple[DeadLetter, bool]:
        """Keep a message ``broker`` gave up on; drop the oldest over the limit.

        Returns the letter, and False when it could not be written to the
        file (it is kept in memory, and logged): the caller then keeps the
        message elsewhere (the spool) rather than lose it at a restart.
        """
        self.last_id += 1
        letter = DeadLetter(
            self.last_id,
            message_id,
            channel,
            message,
            broker,
            attempts,
            [_cut(e, MAX_ERROR_CHARS) for e in list(errors)[-MAX_ERRORS:]],
            time.time(),
        )
        self.letters[letter.id] = letter
        durable = self._write(
            {
                "d": letter.id,
                "i": message_id,
                "c": channel,
                "m": message,
                "b": broker,
                "n": attempts,
                "e": letter.errors,
                "t": letter.when,
            },
            f"cannot record dead letter {letter.id} (message {message_id})",
            "it is kept in memory only",
        )
        if len(self.letters) > self.limit:
            self._drop_oldest()
        return letter, durable

    def get(self, letter_id: int) -> DeadLetter | None:
        """Letter ``letter_id``, or None."""
        return self.letters.get(letter_id)

    def remove(self, letter_ids: Iterable[int]) -> None:
        """Forget these letters (replayed or dropped); unknown ids are ignored.

        One write and one fsync for all of them: ``drop --all`` of ten
        thousand letters must not hold busd's loop for ten thousand fsyncs.
        """
        gone = [i for i in letter_ids if self.letters.pop(i, None) is not None]
        if not gone:
            return
        self._write_frames(
            b"".join(encode_frame({"x": letter_id}) for letter_id in gone),
            f"cannot record that dead letter{'s' if len(gone) > 1 else ''} "
            f"{_some(gone)} {'are' if len(gone) > 1 else 'is'} gone",
            f"{'they come' if len(gone) > 1 else 'it comes'} back after a restart",
        )
        self._removed_records += len(gone)
        if (
            self._fd is not None
            and self._removed_records > 2 * len(self.letters)
            and os.fstat(self._fd).st_size > COMPACT_BYTES
        ):
            self._compact()

    def set_limit(self, limit: int) -> None:
        """Keep at most ``limit`` letters from now on (a reload changed it)."""
        self.limit = limit
        if len(self.letters) > limit:
            self._drop_oldest()

    # -- overflow --------------------------------------------------------------------

    def _drop_oldest(self) -> None:
        extra = len(self.letters) - self.limit
        dropped = [self.letters[i] for i in list(self.letters)[:extra]]
        self.remove(letter.id for letter in dropped)
        self.overflowed += extra
        if self._unlogged is not None:
            self._unlogged += extra
            return
        oldest = dropped[0]
        log.error(
            "Dead letters: the store is full (max_dead_letters %d); dropped the "
            "oldest: dead letter %d (message %d on %r, broker %s)%s; further "
            "drops are counted every %g s",
            self.limit,
            oldest.id,
            oldest.message_id,
            oldest.channel,
            oldest.broker,
            f" and {extra - 1} more" if extra > 1 else "",
            OVERFLOW_WINDOW,
        )
        self._open_window()

    def _open_window(self) -> None:
        self._unlogged = 0
        self._schedule(OVERFLOW_WINDOW, self._close_window)

    def _close_window(self) -> None:
        dropped, self._unlogged = self._unlogged or 0, None
        if dropped:
            log.error(
                "Dead letters: the store is still full; %d more of the oldest "
                "dropped in the last %g s (%d since busd started)",
                dropped,
                OVERFLOW_WINDOW,
                self.overflowed,
            )
            self._open_window()  # the burst goes on: count the next window

    # -- the file ----------------------------------------------------------------------

    def _write(self, record: dict[str, Any], failure: str, consequence: str) -> bool:
        """Append ``record`` and fsync it; False (logged) when that failed."""
        return self._write_frames(encode_frame(record), failure, consequence)

    def _write_frames(self, data: bytes, failure: str, consequence: str) -> bool:
        """Append frames and fsync them; False (logged) when that failed."""
        if self._fd is None:
            return self.path is None  # in memory only, as promised; or closed
        try:
            write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError as error:
            log.error(
                "Dead letters: %s in %s: %s; %s",
                failure,
                self.path,
                error.strerror or error,
                consequence,
            )
            return False
        return True

    def _compact(self) -> None:
        """Rewrite the file with the letters kept only, if the disk lets us."""
        assert self.path is not None
        frames = [encode_frame({"last": self.last_id})]
        frames += [
            encode_frame(
                {
                    "d": letter.id,
                    "i": letter.message_id,
                    "c": letter.channel,
                    "m": letter.message,
                    "b": letter.broker,
                    "n": letter.attempts,
                    "e": letter.errors,
                    "t": letter.when,
                }
            )
            for letter in self.letters.values()
        ]
        if not replace(self.path, frames, LABEL):
            return
        self._removed_records = 0
        if self._fd is not None:  # None while _load() compacts
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND, 0o640)

    def close(self) -> None:
        """Close the file (letters added later stay in memory only)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def preview(message: Any) -> str:
    """``message`` on one short line: a string as it is, anything else as JSON."""
    if isinstance(message, str):
        text = message
    else:
        try:
            text = json.dumps(message, default=repr, ensure_ascii=False)
        except (TypeError, ValueError):  # keys JSON has no form for
            text = repr(message)
    return _cut(text.replace("\n", "\\n"), PREVIEW_CHARS)


def _some(ids: list[int]) -> str:
    """The first ids of a list, for a log line."""
    shown = ", ".join(map(str, ids[:5]))
    return shown + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _call_later(delay: float, callback: Callable[[], None]) -> object:
    return asyncio.get_running_loop().call_later(delay, callback)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
