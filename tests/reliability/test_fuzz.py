"""Fuzzing busd's control socket: bad frames and bad arguments, never a crash.

Counts are bounded for CI; ``BUSD_LONG=1`` runs the full ones (100,000
mutated frames, more Hypothesis examples). Results go in docs/reliability.md.
"""

from __future__ import annotations

import os
import random
import socket
import struct

import msgpack
import psutil
import pytest
from helpers import RawConnection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from busd.protocol import ErrorCode, encode_frame

LONG = os.environ.get("BUSD_LONG") == "1"
MUTATED_FRAMES = 100_000 if LONG else 5_000
EXAMPLES = 2_000 if LONG else 150
# Codes an op may answer bad arguments with; "internal" would be a bug.
TYPED = {c.value for c in ErrorCode} - {ErrorCode.INTERNAL.value}

pytestmark = pytest.mark.reliability

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=200)
    | st.binary(max_size=200),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
ARGUMENT_NAMES = [
    "channel",
    "message",
    "channels",
    "wait",
    "lines",
    "follow",
    "source",
    "stream",
    "broker",
    "instance",
    "instances",
    "versions",
    "client",
    "x",
]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """One daemon for the whole module, so that damage would accumulate."""
    from helpers import start_daemon

    daemon = start_daemon(tmp_path_factory.mktemp("fuzz"), "")
    try:
        yield daemon
    finally:
        daemon.kill()


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    op=st.sampled_from(
        [
            "hello",
            "ping",
            "state",
            "publish",
            "subscribe",
            "events",
            "logs",
            "cancel",
            "broker_start",
            "broker_stop",
            "broker_restart",
            "scale",
            "nosuchop",
        ]
    ),
    arguments=st.dictionaries(
        st.sampled_from(ARGUMENT_NAMES) | st.text(max_size=8), values, max_size=4
    ),
)
def test_every_op_answers_any_arguments_with_a_result_or_a_typed_error(
    fuzzed, op, arguments
):
    arguments = {k: v for k, v in arguments.items() if k not in ("id", "op")}
    with RawConnection(fuzzed.socket) as connection:
        try:
            frame = encode_frame({"id": 1, "op": op, **arguments})
        except Exception:
            return  # a value msgpack cannot carry: nothing to send
        connection.send_bytes(frame)
        answer = connection.receive()
        assert answer["id"] == 1
        if not answer["ok"]:
            assert answer["error"]["code"] in TYPED, answer
            assert answer["error"]["message"]
        connection.send({"id": 2, "op": "ping"})
        while (reply := connection.receive()).get("id") != 2:
            pass  # stream events of the op above
        assert reply == {"id": 2, "ok": True, "result": "pong"}


def mutate(frame: bytes, rng: random.Random) -> bytes:
    """One random corruption of a valid frame."""
    data = bytearray(frame)
    kind = rng.randrange(6)
    if kind == 0:  # flip bits
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # a wrong length in the header
        length = rng.choice([0, 1, len(data), rng.randrange(1 << 20)])
        data[:4] = struct.pack(">I", length)
    elif kind == 2:  # garbage body behind a right header
        body = rng.randbytes(rng.randint(0, 64))
        data = bytearray(struct.pack(">I", len(body)) + body)
    elif kind == 3:  # a body of nested arrays
        depth = rng.randint(1, 3000)
        body = b"\x91" * depth + b"\xc0"
        data = bytearray(struct.pack(">I", len(body)) + body)
    elif kind == 4:  # valid msgpack that is not a request map
        body = msgpack.packb(rng.choice([[1, 2], "op", 7, None, {"id": [1], "op": 2}]))
        data = bytearray(struct.pack(">I", len(body)) + body)
    else:  # invalid UTF-8 in a string
        body = b"\x82\xa2id\x01\xa2op\xa3\xff\xfe\xfd"
        data = bytearray(struct.pack(">I", len(body)) + body)
    return bytes(data)


def test_mutated_frames_never_crash_busd_nor_grow_it(fuzzed):
    rng = random.Random(1234)
    valid = [
        encode_frame({"id": 1, "op": "ping"}),
        encode_frame({"id": "x", "op": "publish", "channel": "c", "message": [1, "a"]}),
        encode_frame({"id": 3, "op": "state"}),
        encode_frame({"id": 4, "op": "logs", "lines": 3}),
    ]
    start_rss = rss(fuzzed.pid)
    sent = 0
    closed = 0
    while sent < MUTATED_FRAMES:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(fuzzed.socket)
        try:
            # A burst per connection; busd may close it at any bad header.
            for _ in range(50):
                sock.sendall(mutate(rng.choice(valid), rng))
                sent += 1
        except (BrokenPipeError, ConnectionResetError):
            closed += 1
        finally:
            sock.close()
        if sent % 1000 < 50:
            with RawConnection(fuzzed.socket) as probe:
                assert probe.request({"id": 0, "op": "ping"})["ok"], f"after {sent}"
    assert fuzzed.process.poll() is None, "busd died"
    with RawConnection(fuzzed.socket) as probe:
        assert probe.request({"id": 0, "op": "ping"})["result"] == "pong"
    grown = rss(fuzzed.pid) - start_rss
    assert grown < 32 << 20, f"RSS grew by {grown} bytes over {sent} frames"
    assert "Traceback" not in fuzzed.log_text()
    print(f"{sent} mutated frames, {closed} connections cut, RSS +{grown >> 10} KiB")
