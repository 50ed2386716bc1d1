"""The dead-letter store in-process: bounds, overflow, the file, damage.

busd/deadletters.py is given a ``schedule`` here: the test fires the end of
an overflow window itself instead of waiting ten seconds.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from core_fakes import busd_log

from busd.deadletters import (
    DEAD_FILE,
    MAX_ERROR_CHARS,
    MAX_ERRORS,
    OVERFLOW_WINDOW,
    PREVIEW_CHARS,
    DeadLetters,
    preview,
)
from busd.protocol import encode_frame


class Timers:
    """A ``schedule`` that keeps the callbacks for the test to fire."""

    def __init__(self) -> None:
        self.pending: list[tuple[float, Callable[[], None]]] = []

    def __call__(self, delay: float, callback: Callable[[], None]) -> None:
        self.pending.append((delay, callback))

    def fire(self) -> None:
        (delay, callback), *self.pending = self.pending
        assert delay == OVERFLOW_WINDOW
        callback()


def add(store: DeadLetters, n: int, channel: str = "main") -> None:
    store.add(100 + n, channel, f"message {n}", "orders", 4, [f"error {n}"])


def test_a_letter_keeps_what_a_broker_gave_up_on() -> None:
    store = DeadLetters()
    letter, durable = store.add(7, "main", {"k": 1}, "orders", 3, ["a", "b", "c"])
    assert durable  # in memory: as durable as promised
    assert (letter.id, store.get(1)) == (1, letter)
    assert letter.record() == {
        "id": 1,
        "message_id": 7,
        "channel": "main",
        "message": {"k": 1},
        "broker": "orders",
        "attempts": 3,
        "errors": ["a", "b", "c"],
        "when": letter.when,
    }
    assert letter.summary()["error"] == "c"
    assert letter.summary()["preview"] == '{"k": 1}'
    assert store.get(2) is None
    assert len(store) == 1


def test_errors_kept_are_the_last_ones_each_cut_short() -> None:
    store = DeadLetters()
    errors = [f"error {i}" for i in range(50)] + ["x" * 5000]
    letter, _ = store.add(1, "main", "m", "orders", 51, errors)
    assert len(letter.errors) == MAX_ERRORS
    assert letter.errors[0] == f"error {51 - MAX_ERRORS}"
    assert len(letter.errors[-1]) == MAX_ERROR_CHARS
    assert letter.errors[-1].endswith("...")
    assert letter.attempts == 51


def test_a_preview_is_one_short_line() -> None:
    assert preview("BUY ABCD 10") == "BUY ABCD 10"
    assert preview("two\nlines") == "two\\nlines"
    assert preview(b"\x00raw") == "\"b'\\\\x00raw'\""
    assert preview({1: [True, None]}) == '{"1": [true, null]}'
    assert preview({b"k": 1}) == "{b'k': 1}"  # no JSON form: repr
    long = preview("x" * 500)
    assert len(long) == PREVIEW_CHARS and long.endswith("...")


def test_ids_go_on_after_removals() -> None:
    store = DeadLetters()
    for n in range(3):
        add(store, n)
    store.remove([1, 3, 99])  # 99: not there, ignored
    add(store, 3)
    assert list(store.letters) == [2, 4]


def test_over_the_bound_the_oldest_go_counted_and_logged_once_per_burst() -> None:
    timers = Timers()
    store = DeadLetters(limit=3, schedule=timers)
    with busd_log() as log:
        for n in range(3):
            add(store, n)
        assert log.lines == [] and timers.pending == []
        for n in range(3, 10):
            add(store, n)
    assert list(store.letters) == [8, 9, 10]
    assert store.overflowed == 7
    # One line for the burst so far, then a count at the window's end.
    assert log.lines == [
        (
            "ERROR",
            "Dead letters: the store is full (max_dead_letters 3); dropped the "
            "oldest: dead letter 1 (message 100 on 'main', broker orders); "
            f"further drops are counted every {OVERFLOW_WINDOW:g} s",
        )
    ]
    with busd_log() as log:
        timers.fire()
    assert log.lines == [
        (
            "ERROR",
            "Dead letters: the store is still full; 6 more of the oldest dropped "
            f"in the last {OVERFLOW_WINDOW:g} s (7 since busd started)",
        )
    ]
    # The burst went on: a new window counts; one without drops ends it.
    assert len(timers.pending) == 1
    with busd_log() as log:
        add(store, 10)
        timers.fire()
        timers.fire()
    assert [line for _, line in log.lines] == [
        "Dead letters: the store is still full; 1 more of the oldest dropped "
        f"in the last {OVERFLOW_WINDOW:g} s (8 since busd started)"
    ]
    assert timers.pending == []
    # The next drop starts a new burst: logged at once again.
    with busd_log() as log:
        add(store, 11)
    assert log.lines[0][1].startswith("Dead letters: the store is full")
    assert store.overflowed == 9


def test_a_lower_limit_drops_the_oldest_at_once() -> None:
    timers = Timers()
    store = DeadLetters(limit=10, schedule=timers)
    for n in range(6):
        add(store, n)
    with busd_log() as log:
        store.set_limit(2)
    assert list(store.letters) == [5, 6]
    assert store.overflowed == 4
    assert log.lines[0][1].endswith(
        "dropped the oldest: dead letter 1 (message 100 on 'main', broker orders) "
        f"and 3 more; further drops are counted every {OVERFLOW_WINDOW:g} s"
    )


# -- the file beside the spool ---------------------------------------------------------


def test_letters_and_removals_survive_reopening(tmp_path: Path) -> None:
    store = DeadLetters(directory=str(tmp_path))
    for n in range(4):
        add(store, n)
    store.remove([2])
    letters = {i: letter.record() for i, letter in store.letters.items()}
    store.close()
    with busd_log() as log:
        again = DeadLetters(directory=str(tmp_path))
    assert {i: letter.record() for i, letter in again.letters.items()} == letters
    assert log.lines == [
        (
            "INFO",
            f"Dead-letter file {tmp_path / DEAD_FILE}: 3 dead letters kept "
            "(`busctl dead list`)",
        )
    ]
    # Removed for good, and the ids of removed letters are not given again.
    again.remove([1, 3, 4])
    again.close()
    third = DeadLetters(directory=str(tmp_path))
    assert list(third.letters) == []
    add(third, 9)
    assert list(third.letters) == [5]
    third.close()


def test_the_file_is_for_busd_and_its_group_only(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        store = DeadLetters(directory=str(tmp_path / "new"))
        add(store, 1)
        store.close()
        assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o750
        path = tmp_path / "new" / DEAD_FILE
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        DeadLetters(directory=str(tmp_path / "new")).close()  # rewritten
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(umask)


def test_more_letters_in_the_file_than_the_limit_drops_the_oldest(
    tmp_path: Path,
) -> None:
    store = DeadLetters(directory=str(tmp_path))
    for n in range(5):
        add(store, n)
    store.close()
    with busd_log() as log:
        again = DeadLetters(limit=2, directory=str(tmp_path))
    assert list(again.letters) == [4, 5]
    assert again.overflowed == 3
    assert log.lines[0] == (
        "ERROR",
        f"Dead-letter file {tmp_path / DEAD_FILE} holds 5 dead letters, over "
        "max_dead_letters (2): the 3 oldest are dropped",
    )
    again.close()


def test_a_torn_last_record_is_ignored(tmp_path: Path) -> None:
    store = DeadLetters(directory=str(tmp_path))
    add(store, 1)
    store.close()
    with open(tmp_path / DEAD_FILE, "ab") as file:
        file.write(struct.pack(">I", 100) + b"\x88half")  # busd died mid-write
    with busd_log() as log:
        again = DeadLetters(directory=str(tmp_path))
    assert [d.message for d in again.letters.values()] == ["message 1"]
    assert any("ends with a torn record" in line for _, line in log.lines)
    assert not list(tmp_path.glob(f"{DEAD_FILE}.damaged-*"))
    again.close()


@pytest.mark.parametrize(
    "record",
    [
        {"d": "1", "i": 1, "c": "main", "m": "x", "b": "o", "n": 1, "e": [], "t": 1},
        {"d": 9, "i": 1, "c": 3, "m": "x", "b": "o", "n": 1, "e": [], "t": 1},
        {"d": 9, "i": 1, "c": "main", "b": "o", "n": 1, "e": [], "t": 1},
        {"d": 9, "i": 1, "c": "main", "m": "x", "b": "o", "n": 1, "e": [3], "t": 1},
        {"d": 9, "i": 1, "c": "main", "m": "x", "b": "o", "n": 1, "e": [], "t": "1"},
        {"d": 9, "i": 1, "c": "main", "m": "x", "b": "o", "n": 1, "e": [], "t": True},
        {"x": "2"},
        {"last": None},
        {"a": 1, "c": "main", "m": "x", "b": ["orders"]},  # a spool record
    ],
)
def test_a_record_of_the_wrong_shape_is_skipped_and_the_file_kept_aside(
    tmp_path: Path, record: dict[str, object]
) -> None:
    store = DeadLetters(directory=str(tmp_path))
    add(store, 1)
    store.close()
    with open(tmp_path / DEAD_FILE, "ab") as file:
        file.write(encode_frame(record))
        file.write(
            encode_frame(
                {"d": 2, "i": 5, "c": "main", "m": "after", "b": "o", "n": 1}
                | {"e": ["e"], "t": 1.5}
            )
        )
    with busd_log() as log:
        again = DeadLetters(directory=str(tmp_path))
    assert {i: d.message for i, d in again.letters.items()} == {
        1: "message 1",
        2: "after",
    }
    assert any("not a dead-letter record" in line for _, line in log.lines)
    [copy] = tmp_path.glob(f"{DEAD_FILE}.damaged-*")
    assert encode_frame(record) in copy.read_bytes()
    again.close()


def test_garbage_ends_the_reading_and_what_came_before_is_kept(tmp_path: Path) -> None:
    store = DeadLetters(directory=str(tmp_path))
    add(store, 1)
    store.close()
    size = (tmp_path / DEAD_FILE).stat().st_size
    with open(tmp_path / DEAD_FILE, "ab") as file:
        file.write(b"\xff\xff\xff\xff garbage")
    with busd_log() as log:
        again = DeadLetters(directory=str(tmp_path))
    assert log.lines[0] == (
        "ERROR",
        f"Dead-letter file {tmp_path / DEAD_FILE} is unreadable from byte {size} "
        f"on (a record of {0xFFFFFFFF} bytes announced, 8 bytes left); the "
        "records before it are kept",
    )
    assert [d.message for d in again.letters.values()] == ["message 1"]
    assert list(tmp_path.glob(f"{DEAD_FILE}.damaged-*"))
    again.close()


def fill_the_disk(store: DeadLetters) -> None:
    """/dev/full answers every write with ENOSPC, like a full file system."""
    assert store._fd is not None
    os.close(store._fd)
    store._fd = os.open("/dev/full", os.O_WRONLY)


def test_a_letter_the_disk_refuses_is_kept_in_memory_and_said_not_durable(
    tmp_path: Path,
) -> None:
    store = DeadLetters(directory=str(tmp_path))
    fill_the_disk(store)
    with busd_log() as log:
        letter, durable = store.add(3, "main", "m", "orders", 1, ["e"])
        store.remove([letter.id])
    assert not durable
    assert store.get(letter.id) is None
    reason = os.strerror(errno.ENOSPC)
    assert log.lines == [
        (
            "ERROR",
            f"Dead letters: cannot record dead letter 1 (message 3) in "
            f"{tmp_path / DEAD_FILE}: {reason}; it is kept in memory only",
        ),
        (
            "ERROR",
            f"Dead letters: cannot record that dead letter 1 is gone in "
            f"{tmp_path / DEAD_FILE}: {reason}; it comes back after a restart",
        ),
    ]
    store.close()


def test_a_file_mostly_removed_letters_is_compacted_while_busd_runs(
    tmp_path: Path,
) -> None:
    store = DeadLetters(limit=100_000, directory=str(tmp_path))
    store.add(1, "main", "kept", "orders", 1, ["e"])
    big = "x" * 20_000
    biggest = 0
    for n in range(400):  # 8 MB written, each letter removed again
        letter, _ = store.add(n + 2, "main", big, "orders", 1, ["e"])
        store.remove([letter.id])
        biggest = max(biggest, (tmp_path / DEAD_FILE).stat().st_size)
    assert biggest < 5 << 20
    add(store, 999)
    store.close()
    again = DeadLetters(directory=str(tmp_path))
    assert [d.message for d in again.letters.values()] == ["kept", "message 999"]
    assert list(again.letters) == [1, 402]
    again.close()


def test_removing_many_letters_is_one_write_and_one_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DeadLetters(directory=str(tmp_path))
    for n in range(100):
        add(store, n)
    fsyncs: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real(fd)))
    store.remove(list(store.letters))
    assert fsyncs == [store._fd]
    monkeypatch.undo()
    store.close()
    assert len(DeadLetters(directory=str(tmp_path))) == 0


def test_a_removal_the_disk_refuses_names_the_letters(tmp_path: Path) -> None:
    store = DeadLetters(directory=str(tmp_path))
    for n in range(7):
        add(store, n)
    fill_the_disk(store)
    with busd_log() as log:
        store.remove([1, 2, 3, 4, 5, 6, 7])
    assert len(store) == 0  # gone for this run
    assert log.lines == [
        (
            "ERROR",
            "Dead letters: cannot record that dead letters 1, 2, 3, 4, 5 and 2 "
            f"more are gone in {tmp_path / DEAD_FILE}: {os.strerror(errno.ENOSPC)}; "
            "they come back after a restart",
        )
    ]
    store.close()
