"""busd survives bad clients: garbage, lies about sizes, stalls, floods.

Every test abuses a real daemon over real sockets, then checks that busd
still answers ``ping`` on a fresh connection and, where it matters, that
another client connected all along was not disturbed.
"""

import contextlib
import os
import random
import resource
import select
import signal
import struct
import threading
import time

import msgpack
import psutil
import pytest
from helpers import RawConnection, answers, pause, wait_for

from busctl.client import BusError, Client

HEADER = struct.Struct(">I")
PING = {"id": "p", "op": "ping"}
PONG = {"id": "p", "ok": True, "result": "pong"}


def frame_of(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def assert_still_serving(daemon, *others):
    """busd answers a new client, and each already-open one still works."""
    # timeout: a sanity deadline (a ping takes a millisecond or so).
    with Client(daemon.socket, timeout=5) as fresh:
        assert fresh.ping() == "pong"
    for other in others:
        if isinstance(other, RawConnection):
            assert other.request(PING) == PONG
        else:
            assert other.ping() == "pong"
    assert daemon.process.poll() is None
    assert "Traceback" not in daemon.log_text()


def assert_refused(reply, code, *words, request_id=None):
    assert reply["id"] == request_id and reply["ok"] is False, reply
    assert reply["error"]["code"] == code, reply
    for word in words:
        assert word in reply["error"]["message"], reply


# Leading bytes that do not start a msgpack map (fixmap, map16, map32).
NOT_A_MAP = [b for b in range(256) if not (0x80 <= b <= 0x8F or b in (0xDE, 0xDF))]


def test_garbage_with_a_small_length_is_answered_frame_by_frame(busd_daemon):
    rng = random.Random(20240501)
    with (
        RawConnection(busd_daemon.socket) as other,
        RawConnection(busd_daemon.socket) as raw,
    ):
        assert other.request(PING) == PONG
        count = 200
        garbage = b"".join(
            frame_of(bytes([rng.choice(NOT_A_MAP)]) + rng.randbytes(rng.randrange(64)))
            for _ in range(count)
        )
        raw.send_bytes(garbage)
        for _ in range(count):
            assert_refused(raw.receive(), "bad_request", "frame")
        # The byte stream is still in step: the next frame is served.
        assert raw.request(PING) == PONG
        assert_still_serving(busd_daemon, other)


def test_garbage_declaring_more_than_max_frame_closes_the_connection(busd_daemon):
    rng = random.Random(7)
    with RawConnection(busd_daemon.socket) as other:
        for _ in range(5):
            with RawConnection(busd_daemon.socket) as raw:
                # A first byte >= 1 means at least 16 MiB: over the 1 MiB limit.
                header = bytes([rng.randrange(1, 256)]) + rng.randbytes(3)
                raw.send_bytes(header + rng.randbytes(rng.randrange(1, 4096)))
                frames = raw.wait_closed()
                assert len(frames) == 1
                assert_refused(frames[0], "too_large", "over the maximum")
        assert_still_serving(busd_daemon, other)


def test_truncated_frame_then_close(busd_daemon):
    with busd_daemon.client() as other:
        assert other.state()["clients"] == 1
        frame = frame_of(msgpack.packb({"id": 1, "op": "ping", "pad": "x" * 100}))
        for cut in (1, 3, 4, 5, len(frame) - 1):  # in the header, at, in the body
            raw = RawConnection(busd_daemon.socket)
            raw.send_bytes(frame[:cut])
            raw.close()
        wait_for(
            lambda: other.state()["clients"] == 1,
            what="the truncated connections to be cleaned up",
        )
        assert_still_serving(busd_daemon, other)


def test_a_4_gib_length_prefix_is_refused_from_the_header_alone(busd_daemon):
    process = psutil.Process(busd_daemon.pid)
    rss_before = process.memory_info().rss
    with (
        RawConnection(busd_daemon.socket) as other,
        RawConnection(busd_daemon.socket) as raw,
    ):
        # Only the header and a few body bytes: the answer may not wait for
        # the other 4 GiB.
        raw.send_bytes(HEADER.pack(2**32 - 1) + b"\x81" + b"\x00" * 1000)
        frames = raw.wait_closed()
        assert len(frames) == 1
        assert_refused(frames[0], "too_large", "4294967295 bytes", "1048576 bytes")
        assert_still_serving(busd_daemon, other)
    grown = process.memory_info().rss - rss_before
    assert grown < 16 << 20, f"busd's RSS grew by {grown} bytes"


@pytest.mark.parametrize(
    ("value", "kind"), [([1, 2, 3], "list"), (7, "int"), ("ping", "str")]
)
def test_msgpack_that_is_not_a_map_is_a_bad_request(busd_daemon, value, kind):
    with RawConnection(busd_daemon.socket) as raw:
        raw.send_bytes(frame_of(msgpack.packb(value)))
        assert_refused(raw.receive(), "bad_request", f"got {kind}")
        assert raw.request(PING) == PONG
        assert_still_serving(busd_daemon)


@pytest.mark.parametrize(
    ("request_", "field", "reply_id"),
    [
        ({"id": True, "op": "ping"}, "'id'", None),
        ({"id": 1.5, "op": "ping"}, "'id'", None),
        ({"id": [1], "op": "ping"}, "'id'", None),
        ({"op": "ping"}, "'id'", None),
        ({"id": "x" * 65, "op": "ping"}, "'id'", "x" * 65),
        ({"id": 3, "op": 5}, "'op'", 3),
        ({"id": 4}, "'op'", 4),
        ({"id": 5, "op": ""}, "'op'", 5),
    ],
)
def test_missing_or_wrong_typed_id_or_op_is_named(
    busd_daemon, request_, field, reply_id
):
    with RawConnection(busd_daemon.socket) as raw:
        reply = raw.request(request_)
        assert_refused(reply, "bad_request", field, request_id=reply_id)
        assert raw.request(PING) == PONG


def test_unknown_op_is_named(busd_daemon):
    with RawConnection(busd_daemon.socket) as raw:
        reply = raw.request({"id": 9, "op": "frobnicate"})
        assert_refused(reply, "unknown_op", "'frobnicate'", "ping", request_id=9)
        assert raw.request(PING) == PONG
        assert_still_serving(busd_daemon)


def test_deep_nesting_is_refused_and_the_connection_goes_on(busd_daemon):
    envelope = {"id": 1, "op": "publish", "channel": "main"}
    deep = b"\x91" * 200_000 + b"\xc0"  # [[[[...None...]]]], 200 KB
    body = b"\x84" + msgpack.packb(envelope)[1:] + msgpack.packb("message") + deep
    assert len(body) < 1 << 20
    with RawConnection(busd_daemon.socket) as raw:
        raw.send_bytes(frame_of(body))
        assert_refused(raw.receive(), "bad_request", "nested too deeply")
        assert raw.request(PING) == PONG
        assert_still_serving(busd_daemon, raw)


def test_a_message_just_under_max_frame_is_accepted(busd_daemon):
    big = "x" * 900_000
    with busd_daemon.client() as listener, busd_daemon.client() as publisher:
        stream = listener.subscribe("main")
        assert publisher.publish("main", big)["subscribers"] == 1
        assert stream.next_event(10) == {"channel": "main", "message": big}
        assert_still_serving(busd_daemon, listener, publisher)


def publish_body(size: int) -> bytes:
    """A msgpack publish request of exactly ``size`` bytes (a frame's body)."""
    request = {"id": 1, "op": "publish", "channel": "main", "message": ""}
    body = msgpack.packb(request)
    request["message"] = "x" * (size - len(body) - 2)  # str16: 2 more bytes
    body = msgpack.packb(request)
    assert len(body) == size
    return body


def test_a_frame_of_exactly_max_frame_is_accepted_and_one_byte_more_refused(
    start_busd,
):
    """``max_frame`` counts the body (not the 4-byte header): a body of
    exactly ``max_frame`` bytes is served, one of ``max_frame + 1`` is
    refused ``too_large`` from its header and the connection closed.
    """
    daemon = start_busd(config_text="[busd]\nmax_frame = 4096\n")
    with RawConnection(daemon.socket) as raw:
        raw.send_bytes(frame_of(publish_body(4096)))
        reply = raw.receive()
        assert (reply["id"], reply["ok"]) == (1, True), reply
        raw.send_bytes(frame_of(publish_body(4097)))
        frames = raw.wait_closed()
    assert len(frames) == 1
    assert_refused(
        frames[0], "too_large", "frame of 4097 bytes is over the maximum of 4096 bytes"
    )
    assert_still_serving(daemon)


def test_invalid_utf8_is_a_bad_request(busd_daemon):
    good = msgpack.packb({"id": 1, "op": "ping"})
    bad_value = good.replace(b"\xa4ping", b"\xa4\xff\xfe\xc0\x80")
    bad_key = good.replace(b"\xa2op", b"\xa2\xc3\x28")
    assert bad_value != good and bad_key != good
    with RawConnection(busd_daemon.socket) as raw:
        for body in (bad_value, bad_key):
            raw.send_bytes(frame_of(body))
            assert_refused(raw.receive(), "bad_request", "UTF-8")
        assert raw.request(PING) == PONG
        assert_still_serving(busd_daemon)


# Long enough that a ping on a loaded 2-core machine (up to about a second)
# still fits in the stall many times over.
STALL_TIMEOUT = 2.0


def test_a_stalled_half_frame_is_cut_off_and_others_are_served(start_busd):
    daemon = start_busd(config_text=f"[busd]\nframe_timeout = {STALL_TIMEOUT}\n")
    frame = frame_of(msgpack.packb({"id": 1, "op": "ping", "pad": "x" * 100}))
    with RawConnection(daemon.socket) as other:
        assert other.request(PING) == PONG
        header_only = RawConnection(daemon.socket)
        half_body = RawConnection(daemon.socket)
        stallers = {header_only.sock: header_only, half_body.sock: half_body}
        started = time.monotonic()
        header_only.send_bytes(frame[:4])
        half_body.send_bytes(frame[: len(frame) // 2])
        cut_off = {}
        pings = 0
        served_while_stalled = 0
        # A sanity deadline: busd cuts them at STALL_TIMEOUT.
        deadline = started + 10 * STALL_TIMEOUT
        while len(cut_off) < len(stallers) and time.monotonic() < deadline:
            waiting = [s for s in stallers if s not in cut_off]
            readable, _, _ = select.select(waiting, [], [], 0.05)
            for sock in readable:
                cut_off[sock] = (time.monotonic() - started, stallers[sock].receive())
            assert other.request(PING) == PONG
            pings += 1
            # busd answers a staller (cutting it) before it closes it, so a
            # ping answered while neither has an answer was served during
            # the stall, not after busd was done waiting on a staller.
            if not cut_off and not select.select(waiting, [], [], 0)[0]:
                served_while_stalled += 1
        assert len(cut_off) == 2, "a staller was never cut off"
        for elapsed, reply in cut_off.values():
            assert_refused(
                reply, "bad_request", "incomplete frame", f"{STALL_TIMEOUT:g} s"
            )
            # Never before frame_timeout (less clock slop).
            assert elapsed >= 0.9 * STALL_TIMEOUT, elapsed
        for staller in stallers.values():
            assert staller.wait_closed() == []
            staller.close()
        assert pings >= 3
        assert served_while_stalled >= 1, pings
        assert_still_serving(daemon, other)
    assert daemon.log_text().count("incomplete frame") == 2


def test_a_subscriber_that_vanishes_mid_stream(busd_daemon):
    total = 3000
    results = []
    subscriber = RawConnection(busd_daemon.socket)
    assert subscriber.request({"id": 1, "op": "subscribe", "channels": ["main"]})["ok"]
    with busd_daemon.client() as publisher:

        def publish_all():
            results.extend(
                publisher.publish_many("main", (f"m{i}" for i in range(total)))
            )

        thread = threading.Thread(target=publish_all)
        thread.start()
        try:
            for i in range(20):
                assert subscriber.receive()["event"]["message"] == f"m{i}"
            subscriber.close()  # abruptly, with events still coming
        finally:
            thread.join(60)
        assert not thread.is_alive()
        assert len(results) == total
        wait_for(
            lambda: publisher.publish("main", "anyone?")["subscribers"] == 0,
            what="the vanished subscriber to be dropped",
        )
        assert_still_serving(busd_daemon, publisher)
    assert "socket.send() raised exception" not in busd_daemon.log_text()


def test_a_reader_that_never_reads_is_disconnected(start_busd):
    daemon = start_busd(config_text="[busd]\nmax_output = 65536\n")
    big = "y" * 100_000
    reader = RawConnection(daemon.socket, max_frame=1 << 20)
    reply = reader.request({"id": 1, "op": "subscribe", "channels": ["main"]})
    assert reply["ok"]
    with daemon.client() as publisher:
        # Each publish adds 100 KB to the reader's unsent output; the kernel
        # buffer takes a few hundred KB, then busd must give up on it.
        wait_for(
            lambda: publisher.publish("main", big)["subscribers"] == 0,
            timeout=20,
            what="busd to drop the reader that does not read",
        )
        wait_for(lambda: "does not read its answers" in daemon.log_text())
        reader.wait_closed()
        reader.close()
        assert publisher.publish("main", big)["subscribers"] == 0
        assert_still_serving(daemon, publisher)


@contextlib.contextmanager
def open_files_limit(wanted):
    """Raise this process's RLIMIT_NOFILE (a daemon started now inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        raise AssertionError(f"hard limit of open files {hard} < {wanted}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_thousand_concurrent_connections(start_busd):
    count = 1000
    with open_files_limit(count + 200):
        daemon = start_busd()
        assert psutil.Process(daemon.pid).rlimit(psutil.RLIMIT_NOFILE)[0] > count + 50
        connections = []
        try:
            for _ in range(count):
                connections.append(RawConnection(daemon.socket))
            for number, connection in enumerate(connections):
                connection.send({"id": number, "op": "ping"})
            for number, connection in enumerate(connections):
                assert connection.receive() == {
                    "id": number,
                    "ok": True,
                    "result": "pong",
                }
            with daemon.client() as client:
                assert client.state()["clients"] == count + 1
        finally:
            for connection in connections:
                connection.close()
        assert_still_serving(daemon)


def test_max_clients_refuses_the_one_too_many(start_busd):
    daemon = start_busd(config_text="[busd]\nmax_clients = 50\n")
    connections = []
    try:
        for number in range(50):
            connection = RawConnection(daemon.socket)
            connections.append(connection)
            # Answered, so busd counts it before the next one arrives.
            assert connection.request({"id": number, "op": "ping"})["ok"]
        with RawConnection(daemon.socket) as extra:
            frames = extra.wait_closed()
        assert len(frames) == 1
        assert_refused(frames[0], "busy", "too many clients")
        with pytest.raises(BusError) as info, daemon.client() as client:
            client.ping()
        assert info.value.code == "busy"
        for connection in connections:
            assert connection.request(PING) == PONG
        connections.pop().close()
        wait_for(lambda: answers(daemon.socket), what="a free slot")
    finally:
        for connection in connections:
            connection.close()
    assert "Refusing client" in daemon.log_text()
    assert_still_serving(daemon)


def test_client_refuses_a_frame_over_max_frame_before_sending(busd_daemon):
    with busd_daemon.client() as client:
        with pytest.raises(BusError) as info:
            client.publish("main", "z" * (2 << 20))
        assert info.value.code == "too_large"
        assert "over the maximum of 1048576 bytes" in info.value.message
        # Nothing was sent: the same connection goes on.
        assert client.ping() == "pong"
        assert_still_serving(busd_daemon, client)
    assert "Closing client" not in busd_daemon.log_text()


def test_a_full_accept_queue_says_busy_and_drains(start_busd):
    daemon = start_busd(config_text="[busd]\nmax_clients = 5\n")
    queued = []
    pause(daemon.pid)  # busd accepts nothing meanwhile
    try:
        for _ in range(200):
            try:
                queued.append(RawConnection(daemon.socket))
            except BlockingIOError:
                break
        # The kernel queues about max_clients (not asyncio's default of 100).
        assert 5 <= len(queued) <= 6, len(queued)
        with pytest.raises(BusError) as info:
            daemon.client()
        assert info.value.code == "busy"
        assert "connection queue" in info.value.message
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    try:
        for number, connection in enumerate(queued[:5]):
            assert connection.request({"id": number, "op": "ping"})["ok"]
        for connection in queued[5:]:
            assert_refused(connection.wait_closed()[0], "busy")
    finally:
        for connection in queued:
            connection.close()
    wait_for(lambda: answers(daemon.socket), what="a free slot")
    assert_still_serving(daemon)
