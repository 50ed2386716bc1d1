"""The spool: accepted messages survive kill -9 of busd.

The first tests use a Spool in-process; the ones marked ``daemon`` (they
use the start_busd fixture) kill a real busd.
"""

import errno
import json
import os
import re
import signal
import stat
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest
from core_fakes import busd_log
from helpers import broker, gone, records, rows, wait_for

import busd.recordfile as recordfile
import busd.spool as spool_module
from busctl.client import BusError
from busd.protocol import encode_frame
from busd.spool import COMPACT_BYTES, FSYNC_INTERVAL, SPOOL_FILE, Spool, SpoolError

TESTS = Path(__file__).resolve().parent


def test_pending_messages_survive_reopening(tmp_path):
    spool = Spool(str(tmp_path), fsync="always")
    spool.accept(1, "main", "BUY ABCD 10", ["orders", "audit"])
    spool.accept(2, "main", {"structured": True}, ["orders"])
    assert spool.last_id == 2  # what a rewrite while busd runs records
    spool.settle(1, "orders")
    spool.settle(2, "orders")
    spool.close()
    again = Spool(str(tmp_path))
    assert list(again.pending) == [1]
    assert again.pending[1].brokers == {"audit"}
    assert again.pending[1].message == "BUY ABCD 10"
    assert again.last_id == 2
    again.close()
    # Reopened again (after the rewrite dropped message 2's records), new
    # ids still start after 2.
    assert Spool(str(tmp_path)).last_id == 2


def test_a_torn_last_record_is_ignored(tmp_path):
    spool = Spool(str(tmp_path))
    spool.accept(1, "main", "kept", ["orders"])
    spool.close()
    with open(tmp_path / SPOOL_FILE, "ab") as file:
        file.write(struct.pack(">I", 100) + b"\x85half")  # busd died mid-write
    again = Spool(str(tmp_path))
    assert [p.message for p in again.pending.values()] == ["kept"]
    again.close()


def test_reopening_compacts_settled_records_away(tmp_path):
    spool = Spool(str(tmp_path), fsync="never")
    for i in range(1, 1001):
        spool.accept(i, "main", "x" * 100, ["orders"])
        if i != 500:
            spool.settle(i, "orders")
    spool.close()
    size_before = (tmp_path / SPOOL_FILE).stat().st_size
    again = Spool(str(tmp_path))
    assert list(again.pending) == [500]
    assert (tmp_path / SPOOL_FILE).stat().st_size < size_before / 100
    again.close()


def fill_the_disk(spool):
    """/dev/full answers every write with ENOSPC, like a full file system."""
    os.close(spool._fd)
    spool._fd = os.open("/dev/full", os.O_WRONLY)


def test_a_full_disk_refuses_instead_of_accepting(tmp_path):
    spool = Spool(str(tmp_path))
    fill_the_disk(spool)
    with pytest.raises(SpoolError) as info:
        spool.accept(1, "main", "lost?", ["orders"])
    assert str(info.value) == (
        f"cannot write the spool {spool.path}: {os.strerror(errno.ENOSPC)}"
    )
    assert spool.pending == {}


def test_a_settlement_that_cannot_be_recorded_is_logged_and_kept_pending(tmp_path):
    spool = Spool(str(tmp_path))
    spool.accept(3, "main", "m", ["orders"])
    fill_the_disk(spool)
    with busd_log() as log:
        spool.settle(3, "orders")  # not fatal: delivered once more, at worst
    assert log.lines == [
        (
            "ERROR",
            "Spool: cannot record that message 3 is done: cannot write the spool "
            f"{spool.path}: {os.strerror(errno.ENOSPC)}",
        )
    ]
    assert spool.pending[3].brokers == {"orders"}


def test_settling_what_the_spool_does_not_hold_changes_nothing(tmp_path):
    spool = Spool(str(tmp_path))
    spool.accept(1, "main", "m", ["orders", "audit"])
    size = (tmp_path / SPOOL_FILE).stat().st_size
    spool.settle(2, "orders")  # no such message
    spool.settle(1, "billing")  # not one of its brokers
    assert (tmp_path / SPOOL_FILE).stat().st_size == size
    spool.settle(1, "orders")
    assert spool.pending[1].brokers == {"audit"}
    spool.settle(1, "audit")
    assert spool.pending == {}
    spool.close()


def test_a_closed_spool_refuses_and_closing_twice_is_harmless(tmp_path):
    spool = Spool(str(tmp_path))
    spool.close()
    spool.close()
    with pytest.raises(SpoolError) as info:
        spool.accept(1, "main", "m", ["orders"])
    assert str(info.value) == f"the spool {spool.path} is closed"


def test_an_unknown_fsync_mode_is_refused(tmp_path):
    with pytest.raises(ValueError) as info:
        Spool(str(tmp_path), fsync="sometimes")
    assert str(info.value) == (
        "spool fsync must be one of ('always', 'interval', 'never'), got 'sometimes'"
    )


@pytest.fixture
def fsyncs(monkeypatch):
    """The descriptors os.fsync is called on, from now on."""
    calls = []
    real = os.fsync

    def fsync(fd):
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(spool_module.os, "fsync", fsync)
    return calls


@pytest.mark.parametrize(("mode", "synced"), [("always", 3), ("never", 0)])
def test_fsync_always_syncs_each_record_and_never_none(tmp_path, fsyncs, mode, synced):
    spool = Spool(str(tmp_path), fsync=mode)
    fsyncs.clear()
    spool.accept(1, "main", "a", ["orders"])
    spool.accept(2, "main", "b", ["orders"])
    spool.settle(1, "orders")
    assert fsyncs == [spool._fd] * synced
    spool.close()


def test_fsync_interval_syncs_at_most_every_interval(tmp_path, fsyncs, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(spool_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    spool = Spool(str(tmp_path), fsync="interval")
    fsyncs.clear()
    synced = []
    for step in (0, 0.01, 0.02, FSYNC_INTERVAL, 0.01, FSYNC_INTERVAL + 0.01):
        now[0] += step
        spool.accept(len(synced) + 1, "main", "m", ["orders"])
        synced.append(len(fsyncs))
    # The first write syncs; then one sync per FSYNC_INTERVAL at most.
    assert synced == [1, 1, 1, 2, 2, 3]
    spool.close()


def test_the_spool_is_for_busd_and_its_group_only(tmp_path):
    umask = os.umask(0o022)
    try:
        directory = tmp_path / "new"
        spool = Spool(str(directory))
        spool.accept(1, "main", "m", ["orders"])
        spool.close()
        assert stat.S_IMODE(directory.stat().st_mode) == 0o750
        assert stat.S_IMODE((directory / SPOOL_FILE).stat().st_mode) == 0o640
        # Reopening rewrites the file (compaction): the mode stays.
        Spool(str(directory)).close()
        assert stat.S_IMODE((directory / SPOOL_FILE).stat().st_mode) == 0o640
    finally:
        os.umask(umask)


def test_loading_logs_torn_and_unreadable_records_and_what_is_pending(tmp_path):
    spool = Spool(str(tmp_path))
    spool.accept(1, "main", "kept", ["orders"])
    spool.accept(2, "main", "settled", ["orders"])
    spool.settle(2, "orders")
    spool.close()
    with open(tmp_path / SPOOL_FILE, "ab") as file:
        body = msgpack.packb([1, 2])  # a frame, but not a map
        file.write(struct.pack(">I", len(body)) + body)
        file.write(struct.pack(">I", 100) + b"\x85half")  # busd died mid-write
    with busd_log() as log:
        again = Spool(str(tmp_path))
    path = again.path
    # A record that is not ours is skipped, the torn end ignored, and the
    # damaged file kept aside before the compaction rewrites it.
    *lines, (level, kept), pending = log.lines
    assert lines == [
        (
            "WARNING",
            f"Spool {path}: unreadable record skipped: "
            "frame must hold a msgpack map, got list",
        ),
        (
            "WARNING",
            f"Spool {path} ends with a torn record (9 bytes; busd died while "
            "writing it): ignored",
        ),
    ]
    assert level == "ERROR"
    assert kept.startswith(
        f"Spool {path} was damaged; the file as it was is kept as {path}.damaged-"
    )
    assert pending == ("INFO", f"Spool {path}: 1 messages to deliver again")
    [entry] = again.pending.values()
    assert (entry.id, entry.channel, entry.message, entry.brokers) == (
        1,
        "main",
        "kept",
        {"orders"},
    )
    assert again.last_id == 2
    again.close()


def test_a_record_claiming_over_2_gib_is_damage_the_records_before_it_kept(
    tmp_path,
):
    spool = Spool(str(tmp_path))
    spool.accept(1, "main", "m", ["orders"])
    spool.close()
    size = (tmp_path / SPOOL_FILE).stat().st_size
    with open(tmp_path / SPOOL_FILE, "ab") as file:
        file.write(struct.pack(">I", (1 << 31) + 1) + b"garbage")
    with busd_log() as log:
        again = Spool(str(tmp_path))
    path = again.path
    assert log.lines[0] == (
        "ERROR",
        f"Spool {path} is unreadable from byte {size} on (a record of "
        f"{(1 << 31) + 1} bytes announced, 7 bytes left); the records before "
        "it are kept",
    )
    assert [e.message for e in again.pending.values()] == ["m"]
    assert list(tmp_path.glob(f"{SPOOL_FILE}.damaged-*"))
    again.close()


def append_records(path, *records):
    """Write ``records`` at the end of the spool file, as busd frames them."""
    with open(path, "ab") as file:
        for record in records:
            file.write(encode_frame(record))


@pytest.mark.parametrize(
    "record",
    [
        {"a": "1", "c": "main", "m": "x", "b": ["orders"]},  # id not an int
        {"a": True, "c": "main", "m": "x", "b": ["orders"]},  # a bool is no id
        {"a": 9, "c": 7, "m": "x", "b": ["orders"]},  # channel not a string
        {"a": 9, "c": "main", "b": ["orders"]},  # no message
        {"a": 9, "c": "main", "m": "x", "b": "orders"},  # brokers not a list
        {"a": 9, "c": "main", "m": "x", "b": ["orders", 3]},  # a broker not a str
        {"s": 1, "b": 3},  # a settlement whose broker is not a string
        {"s": "1", "b": "orders"},  # a settlement whose id is not an int
        {"last": "9"},  # a last id that is not one
        {"x": 1},  # none of ours
    ],
)
def test_a_record_of_the_wrong_shape_is_skipped_and_kept_aside(tmp_path, record):
    """A record busd did not write changes nothing it holds: the messages
    before and after it are read, and the damaged file is kept."""
    spool = Spool(str(tmp_path))
    spool.accept(1, "main", "before", ["orders"])
    spool.close()
    append_records(
        tmp_path / SPOOL_FILE,
        record,
        {"a": 2, "c": "main", "m": "after", "b": ["orders"]},
    )
    with busd_log() as log:
        again = Spool(str(tmp_path))
    assert {e.id: e.message for e in again.pending.values()} == {
        1: "before",
        2: "after",
    }
    assert again.last_id == 2
    levels = [level for level, line in log.lines if "not a spool record" in line]
    assert levels == ["WARNING"]
    assert any("was damaged; the file as it was is kept" in t for _, t in log.lines)
    [copy] = tmp_path.glob(f"{SPOOL_FILE}.damaged-*")
    assert encode_frame(record) in copy.read_bytes()
    again.close()


def test_an_unknown_record_is_named_by_its_first_five_keys(tmp_path):
    Spool(str(tmp_path)).close()
    append_records(tmp_path / SPOOL_FILE, {k: 1 for k in "gfedcba"})
    with busd_log() as log:
        Spool(str(tmp_path)).close()
    path = tmp_path / SPOOL_FILE
    assert log.lines[0] == (
        "WARNING",
        f"Spool {path}: unreadable record skipped: not a spool record "
        "(keys ['a', 'b', 'c', 'd', 'e'])",
    )
    [copy] = tmp_path.glob(f"{SPOOL_FILE}.damaged-*")
    # Named by the time it was found: busd.spool.damaged-YYYYmmddTHHMMSS.
    assert re.fullmatch(rf"{SPOOL_FILE}\.damaged-\d{{8}}T\d{{6}}", copy.name)


@pytest.mark.parametrize(
    ("length", "after", "damage"),
    [
        # A header only: busd died between the header and the body.
        (10, b"", False),
        # Exactly the largest record busd reads, its start like a record's.
        (1 << 31, b"\x85", False),
        # One byte more is damage, whatever follows.
        ((1 << 31) + 1, b"\x85", True),
    ],
)
def test_the_end_of_a_spool_is_torn_or_damaged(tmp_path, length, after, damage):
    spool = Spool(str(tmp_path))
    spool.accept(1, "main", "kept", ["orders"])
    spool.close()
    with open(tmp_path / SPOOL_FILE, "ab") as file:
        file.write(struct.pack(">I", length) + after)
    with busd_log() as log:
        again = Spool(str(tmp_path))
    assert [e.message for e in again.pending.values()] == ["kept"]
    levels = {level for level, _ in log.lines}
    assert ("ERROR" in levels) == damage
    assert bool(list(tmp_path.glob(f"{SPOOL_FILE}.damaged-*"))) == damage
    if not damage:
        assert any("ends with a torn record" in line for _, line in log.lines)
    again.close()


def test_a_settlement_and_a_last_id_are_read_as_such(tmp_path):
    spool = Spool(str(tmp_path))
    spool.accept(1, "main", "one", ["a", "b"])
    spool.close()
    append_records(tmp_path / SPOOL_FILE, {"s": 1, "b": "a"}, {"last": 7})
    with busd_log() as log:
        again = Spool(str(tmp_path))
    [entry] = again.pending.values()
    assert entry.brokers == {"b"}  # settled by a, still owed to b
    assert again.last_id == 7
    assert not list(tmp_path.glob(f"{SPOOL_FILE}.damaged-*"))
    assert all(level == "INFO" for level, _ in log.lines)
    again.close()


def test_a_damaged_spool_whose_copy_cannot_be_made_says_so(tmp_path, monkeypatch):
    spool = Spool(str(tmp_path))
    spool.accept(1, "main", "kept", ["orders"])
    spool.close()
    append_records(tmp_path / SPOOL_FILE, {"x": 1})

    def refuse(source, target):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(recordfile.shutil, "copyfile", refuse)
    with busd_log() as log:
        again = Spool(str(tmp_path))
    path = again.path
    assert (
        "ERROR",
        f"Spool {path}: cannot keep a copy of the damaged file: Permission denied",
    ) in log.lines
    assert not any("was damaged" in line for _, line in log.lines)
    assert [e.message for e in again.pending.values()] == ["kept"]
    again.close()


def big_messages(count):
    """Messages enough to take the spool file past COMPACT_BYTES."""
    size = 2 * COMPACT_BYTES // count
    return [f"{i:08}".ljust(size, "x") for i in range(count)]


def test_a_spool_mostly_settled_is_compacted_while_busd_runs(tmp_path):
    spool = Spool(str(tmp_path), fsync="never")
    spool.accept(1, "main", "never settled", ["slow"])
    biggest = 0
    for message_id, message in enumerate(big_messages(200), start=2):
        spool.accept(message_id, "main", message, ["fast"])
        spool.settle(message_id, "fast")
        biggest = max(biggest, (tmp_path / SPOOL_FILE).stat().st_size)
    # Rewritten as it went: never far past COMPACT_BYTES, though 2 x that
    # was written, and the message still pending kept the file from emptying.
    assert biggest < COMPACT_BYTES + 2 * COMPACT_BYTES // 200
    assert (tmp_path / SPOOL_FILE).stat().st_size < COMPACT_BYTES
    # Records appended after a compaction land in the new file.
    spool.accept(500, "other", {"after": True}, ["fast", "slow"])
    spool.settle(500, "fast")
    spool.close()
    again = Spool(str(tmp_path))
    assert {i: (e.channel, e.message, e.brokers) for i, e in again.pending.items()} == {
        1: ("main", "never settled", {"slow"}),
        500: ("other", {"after": True}, {"slow"}),
    }
    assert again.last_id == 500
    again.close()


def test_a_compaction_that_fails_leaves_the_spool_as_it_was(tmp_path, monkeypatch):
    spool = Spool(str(tmp_path), fsync="never")
    spool.accept(1, "main", "kept", ["orders"])
    spool.close()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(spool_module.os, "fsync", full)
    with busd_log() as log:
        again = Spool(str(tmp_path), fsync="never")  # compacts: fails
    assert log.lines[-1] == (
        "WARNING",
        f"Spool {again.path}: cannot compact it (No space left on device); "
        "keeping it as it is",
    )
    assert sorted(os.listdir(tmp_path)) == [SPOOL_FILE]  # no half-written copy
    again.accept(2, "main", "appended", ["orders"])
    monkeypatch.undo()
    again.close()
    assert sorted(Spool(str(tmp_path)).pending) == [1, 2]


def test_a_compaction_whose_copy_cannot_be_made_or_removed_goes_on(tmp_path):
    spool = Spool(str(tmp_path))
    spool.accept(1, "main", "kept", ["orders"])
    spool.close()
    (tmp_path / (SPOOL_FILE + ".new")).mkdir()  # in the way, and not a file
    with busd_log() as log:
        again = Spool(str(tmp_path))
    assert "cannot compact it (Is a directory)" in log.lines[-1][1]
    assert sorted(again.pending) == [1]
    again.close()


def broker_config(tmp_path, handler, record):
    return f"""
[busd]
spool = "{tmp_path / "spool"}"

[brokers.orders]
handler = "spool_brokers:{handler}"
cwd = "{TESTS}"
channels = ["main"]
restart = "never"
env = {{ RECORD = "{record}" }}
"""


def test_kill_9_of_busd_loses_no_accepted_message(start_busd, tmp_path):
    record = tmp_path / "record.jsonl"
    first = start_busd(broker_config(tmp_path, "Broken", record))
    messages = [f"BUY CODE {i}" for i in range(200)]
    with first.client() as client:
        results = client.publish_many("main", messages)
        assert all(r["brokers"] == 1 for r in results)
        assert client.state()["brokers"]["orders"]["queued"] == 200
    os.kill(first.pid, signal.SIGKILL)
    first.process.wait(10)

    # The same spool, now with a broker that works.
    second = start_busd(broker_config(tmp_path, "Recorder", record))
    wait_for(
        lambda: record.exists() and len(record.read_text().splitlines()) >= 200,
        timeout=30,
        what="the spooled messages to be delivered after the restart",
    )
    got = [json.loads(line) for line in record.read_text().splitlines()]
    assert sorted(got) == sorted(messages)
    with second.client() as client:
        wait_for(lambda: client.state()["brokers"]["orders"]["acked"] == 200)
        new = client.publish("main", "after the restart")
    assert new["id"] > max(r["id"] for r in results)  # ids continue
    assert second.stop() == 0
    assert "200 messages to deliver again" in second.log_text()


def test_settled_messages_are_not_delivered_again(start_busd, tmp_path):
    """Messages acked before a kill -9 are settled in the spool: the next busd
    delivers none of them again.

    (``accepted`` counts publishes only, never what the spool restores, so
    it cannot tell.) The one instance takes its messages in order, and what
    the spool restores is queued before anything published after the start:
    once a marker published now is acked, a replay would have been handled
    and recorded before it.
    """
    record = tmp_path / "record.jsonl"
    config = broker_config(tmp_path, "Recorder", record)
    first = start_busd(config)
    with first.client() as client:
        for i in range(20):
            client.call("publish", channel="main", message=f"m{i}", wait=True)
    os.kill(first.pid, signal.SIGKILL)
    first.process.wait(10)
    second = start_busd(config)
    with second.client() as client:
        marker = client.call("publish", channel="main", message="marker", wait=True)
        assert (marker["acked"], marker["dead"]) == (1, 0)
        assert client.state()["brokers"]["orders"]["acked"] == 1  # the marker only
    got = [json.loads(line) for line in record.read_text().splitlines()]
    assert got == [f"m{i}" for i in range(20)] + ["marker"]
    assert second.stop() == 0
    assert "to deliver again" not in second.log_text()


def test_kill_9_with_messages_in_flight_replays_exactly_the_unsettled_ones(
    start_busd, tmp_path
):
    """busd SIGKILLed while a working broker has messages in flight.

    Promises: every accepted message is handled; each message the spool
    replays after the restart is flagged ``redelivered`` (among them those
    a worker had in hand at the kill); a message that went dead before the
    kill was settled in the spool and is not replayed.

    The broker records a message when it takes it in hand, then works 0.1 s
    on it (two instances, four in flight each); some messages always fail
    and go dead after two attempts. A record file per busd tells what each
    one's workers got.
    """
    spool = tmp_path / "spool"
    before, after = tmp_path / "before.jsonl", tmp_path / "after.jsonl"

    def config(record: Path) -> str:
        return f'[busd]\nspool = "{spool}"\n\n' + broker(
            "work",
            "brokers_for_tests:SlowFailTimes",
            record,
            env={"SLEEP": "0.1"},
            instances=2,
            max_inflight=4,
            max_retries=1,
        )

    total = 60
    poison = {1, 4, 40, 55}  # these always fail: dead after 2 attempts
    messages = [{"n": n, "fail": 99} if n in poison else {"n": n} for n in range(total)]
    first = start_busd(config(before))
    with first.client() as listener, first.client() as client:
        dead = listener.subscribe("dead")
        results = client.publish_many("main", messages)
        assert [r["brokers"] for r in results] == [1] * total
        # Two letters: messages 1 and 4 are dead, settled in the spool.
        buried = {dead.next_event(20)["message"]["message"]["n"] for _ in range(2)}
        assert buried == {1, 4}
        workers = [row["pid"] for row in rows(client, "work")]
        fork_server = first.fork_server_pid()
        assert len(numbers(records(before))) < total, "too late: all were handled"
        os.kill(first.pid, signal.SIGKILL)
        first.process.wait(10)
    # Its fork server and workers die with it (parent-death signals); the
    # next busd, on another socket, would not take them for its orphans.
    leftovers = [fork_server, *workers]
    try:
        wait_for(
            lambda: all(gone(pid) for pid in leftovers),
            timeout=10,
            what="the killed busd's fork server and workers to end",
        )
    finally:
        for pid in leftovers:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
    in_hand = numbers(records(before))

    second = start_busd(config(after))
    replayed = int(
        re.search(r"(\d+) messages to deliver again", second.log_text()).group(1)
    )
    with second.client() as client:

        def settled() -> dict | None:
            state = client.state()["brokers"]["work"]
            done = state["acked"] + state["dead"] == replayed and not state["queued"]
            return state if done else None

        state = wait_for(settled, 30, "every replayed message acked or dead")
    again = records(after)
    assert len(numbers(again)) == replayed
    assert all(r["redelivered"] is True for r in again), again
    assert numbers(again) & in_hand, "no message was in hand at the kill"
    assert not numbers(again) & buried, "a dead message was replayed"
    assert in_hand | numbers(again) == set(range(total))
    assert state["dead"] == len(numbers(again) & poison)
    assert state["acked"] == replayed - state["dead"]
    assert second.stop() == 0


def numbers(found: list[dict]) -> set[int]:
    """The message numbers in a SlowFailTimes record file."""
    return {r["message"]["n"] for r in found}


AFTER = encode_frame({"a": 4, "c": "main", "m": "after", "b": ["orders"]})

CORRUPTIONS = {
    # Bytes no busd wrote, between records: a header of 3.7 GB.
    "garbage in the middle": (b"\xde\xad\xbe\xef" * 8 + AFTER, []),
    # busd died while writing the last record: nothing follows it.
    "a torn last record": (struct.pack(">I", 200) + b"\x84\xa1a\x05\xa1c", []),
    # A well-framed record that is not one of ours (an accepted message
    # without its channel), then a good one: it is read too.
    "a record of the wrong shape": (
        encode_frame({"a": 99, "m": "no channel"}) + AFTER,
        ["after"],
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_damaged_spool_is_read_up_to_the_damage(start_busd, tmp_path, corruption):
    """busd starts on a damaged spool, says so in its log, and delivers every
    message the spool held before the damage (settled ones excepted).

    Where the file was damaged rather than torn, it is kept as it was
    beside the spool before busd's start-up compaction rewrites it.
    """
    damage, readable_after = CORRUPTIONS[corruption]
    directory = tmp_path / "spool"
    spool = Spool(str(directory))
    for number in (1, 2, 3):
        spool.accept(number, "main", f"before {number}", ["orders"])
    spool.settle(2, "orders")
    spool.close()
    at = (directory / SPOOL_FILE).stat().st_size  # where the damage starts
    with open(directory / SPOOL_FILE, "ab") as file:
        file.write(damage)
    original = (directory / SPOOL_FILE).read_bytes()

    record = tmp_path / "record.jsonl"
    daemon = start_busd(broker_config(tmp_path, "Recorder", record))
    with daemon.client() as client:
        # What the spool restored is queued before this, for the one instance.
        client.call("publish", channel="main", message="marker", wait=True)
    got = [json.loads(line) for line in record.read_text().splitlines()]
    assert got == ["before 1", "before 3", *readable_after, "marker"]
    assert daemon.stop() == 0
    log = daemon.log_text()
    assert "Traceback" not in log
    copies = list(directory.glob(f"{SPOOL_FILE}.damaged-*"))
    if corruption == "a torn last record":
        assert f"ends with a torn record ({len(damage)} bytes" in log
        assert copies == []
    else:
        says = {
            "garbage in the middle": f"is unreadable from byte {at} on",
            "a record of the wrong shape": "unreadable record skipped: not a spool",
        }[corruption]
        assert says in log
        assert f"was damaged; the file as it was is kept as {copies[0]}" in log
        assert [copy.read_bytes() for copy in copies] == [original]


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 64 KiB tmpfs, so that the spool really runs out of space."""
    mount_point = tmp_path / "spool"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    assert mounted.returncode == 0, mounted.stderr
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_spool_disk_makes_publish_busy(start_busd, tmp_path, tiny_filesystem):
    daemon = start_busd(broker_config(tmp_path, "Broken", tmp_path / "r"))
    accepted = 0
    with daemon.client() as client:
        with pytest.raises(BusError) as info:
            for _ in range(1000):
                client.publish("main", "x" * 1000)
                accepted += 1
        assert info.value.code == "busy"
        assert "No space left on device" in info.value.message
        assert "not accepted" in info.value.message
        assert 0 < accepted < 1000
        state = client.state()
        assert client.ping() == "pong"
    # Everything that was accepted is queued; nothing else.
    assert state["brokers"]["orders"]["accepted"] == accepted
    assert daemon.stop() == 0
    # And the spool holds exactly those, with no torn record in between.
    reopened = Spool(str(tiny_filesystem))
    assert len(reopened.pending) == accepted
    reopened.close()
