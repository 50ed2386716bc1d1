"""Fuzzing busd's control socket: bad frames and bad arguments, never a crash.

Counts are bounded for CI; ``BUSD_LONG=1`` (scripts/reliability) runs the full
ones (100,000 mutated frames, more Hypothesis examples). Results go in
docs/reliability.md.

The fuzzed busd runs two real brokers, so that broker ops and publishes
reach the supervisor and the router instead of stopping at "no broker".
"""

from __future__ import annotations

import collections
import os
import random
import socket
import struct
from typing import Any

import msgpack
import psutil
import pytest
from helpers import RawConnection, broker, start_daemon
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from busd.ops.brokers import MAX_INSTANCES
from busd.protocol import ErrorCode, encode_frame

LONG = os.environ.get("BUSD_LONG") == "1"
MUTATED_FRAMES = 100_000 if LONG else 5_000
EXAMPLES = 2_000 if LONG else 150
# Codes an op may answer bad arguments with; "internal" would be a bug.
TYPED = {c.value for c in ErrorCode} - {ErrorCode.INTERNAL.value}
# How much busd's RSS may grow over either test.
RSS_GROWTH_BOUND = 32 << 20

pytestmark = pytest.mark.reliability

# The fuzzed daemon's brokers, name -> (channels, configured instances):
# Recorders with no RECORD file, so they ack every message and write nothing.
BROKERS = {"alpha": (("main",), 1), "beta": (("main", "side"), 2)}
CHANNELS = ["main", "side"]
# The most instances the fuzzer asks ``scale`` for. Instance counts from
# MAX_SCALE + 1 to MAX_INSTANCES (256) go through the same code as 0 to 3,
# but 256 handler workers of two brokers would take the 2 cores and the
# memory of a CI machine; busd's config has no per-broker limit to lower
# instead, so the fuzzer caps what it sends (``capped``). Counts outside
# 0..256 are sent as they come: busd refuses them before doing anything.
MAX_SCALE = 3

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
    "after",
    "limit",
    "letter",
    "ids",
    "all",
    "x",
]
# The arguments each op takes (busd/ops/: the names its ``check.only`` allows).
OP_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "hello": ("versions", "client"),
    "ping": (),
    "state": (),
    "publish": ("channel", "message", "wait"),
    "subscribe": ("channels",),
    "events": (),
    "logs": ("lines", "follow", "source"),
    "cancel": ("stream",),
    "broker_start": ("broker", "instance"),
    "broker_stop": ("broker", "instance"),
    "broker_restart": ("broker", "instance"),
    "scale": ("broker", "instances"),
    "dead_list": ("after", "limit"),
    "dead_show": ("letter",),
    "dead_replay": ("ids", "all"),
    "dead_drop": ("ids", "all"),
    "nosuchop": (),
}
# ``shutdown`` and ``reload`` take no argument and are only ever sent with
# one or more (``request_for``), which busd must refuse before acting: a
# shutdown that went through would end the daemon under test, and a reload
# would put the brokers back as configured in the middle of the run (the
# reload tests are in tests/test_daemon.py and test_broker_lifecycle.py).
# Every other op gets any arguments, none or many.
REFUSED_ONLY = ("shutdown", "reload")

broker_names = st.sampled_from(sorted(BROKERS))
channel_names = st.sampled_from(CHANNELS)
out_of_range = st.integers(max_value=-1, min_value=-(2**63)) | st.integers(
    min_value=MAX_INSTANCES + 1, max_value=2**64 - 1
)
# Per argument: right values (real brokers, channels and instance numbers,
# more often than not), values just out of range, and anything at all. A
# strategy listed twice in a ``|`` is drawn about twice as often.
ARGUMENTS: dict[str, st.SearchStrategy[Any]] = {
    "channel": channel_names | channel_names | st.text(max_size=70) | values,
    "message": values,
    "wait": st.booleans() | st.booleans() | values,
    "channels": st.lists(channel_names | st.text(max_size=8), max_size=3) | values,
    "lines": st.integers(0, 100) | values,
    "follow": st.booleans() | values,
    "source": st.sampled_from(["busd", "alpha", "beta:1"]) | values,
    "stream": st.integers(0, 10) | values,
    "broker": broker_names
    | broker_names
    | broker_names
    | st.text(max_size=12)
    | values,
    "instance": (
        st.integers(0, MAX_SCALE - 1)
        | st.integers(0, MAX_SCALE - 1)
        | st.integers(-1, MAX_SCALE + 1)
        | out_of_range
        | values
    ),
    "instances": (
        st.integers(0, MAX_SCALE) | st.integers(0, MAX_SCALE) | out_of_range | values
    ),
    "versions": st.lists(st.integers(-1, 3), max_size=3) | values,
    "client": st.text(max_size=20) | values,
    # The fuzzed brokers ack everything: no dead letter exists, so these
    # reach the argument checks and the store's "not found".
    "after": st.integers(0, 10) | out_of_range | values,
    "limit": st.integers(0, 1001) | values,
    "letter": st.integers(0, 10) | values,
    "ids": st.lists(st.integers(0, 10), max_size=3) | values,
    "all": st.booleans() | values,
    "x": values,
}
any_name = (st.sampled_from(ARGUMENT_NAMES) | st.text(max_size=8)).filter(
    lambda name: name not in ("id", "op")
)
anything = st.dictionaries(any_name, values, max_size=4)


def arguments_for(op: str) -> st.SearchStrategy[dict[str, Any]]:
    """Argument maps for ``op``: its own names, with extras, or anything."""
    own = {name: ARGUMENTS[name] for name in OP_ARGUMENTS[op]}
    every = st.fixed_dictionaries(own)
    some = st.fixed_dictionaries({}, optional=own)
    extra = st.tuples(some, anything).map(lambda pair: {**pair[1], **pair[0]})
    return every | every | every | some | extra | anything


def request_for(op: str) -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    """``(op, arguments)``; for ``shutdown`` and ``reload`` never an empty map."""
    if op in REFUSED_ONLY:
        arguments = st.dictionaries(any_name, values, min_size=1, max_size=4)
    else:
        arguments = arguments_for(op)
    return st.tuples(st.just(op), arguments)


requests = st.sampled_from([*OP_ARGUMENTS, *REFUSED_ONLY]).flatmap(request_for)


def capped(op: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """``arguments`` with a ``scale`` of MAX_SCALE + 1 to 256 made MAX_SCALE.

    ``values`` holds any int, and Hypothesis favours numbers it finds in the
    code under test (MAX_INSTANCES = 256 is one): ``anything`` asks for them.
    """
    count = arguments.get("instances")
    if (
        op == "scale"
        and isinstance(count, int)
        and not isinstance(count, bool)
        and MAX_SCALE < count <= MAX_INSTANCES
    ):
        return {**arguments, "instances": MAX_SCALE}
    return arguments


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """One daemon for the whole module, so that damage would accumulate."""
    config = "".join(
        broker(name, "brokers_for_tests:Recorder", channels=channels, instances=count)
        for name, (channels, count) in BROKERS.items()
    )
    daemon = start_daemon(tmp_path_factory.mktemp("fuzz"), config)
    try:
        yield daemon
        # Its workers as they are now (the fuzzer scaled and restarted them).
        with daemon.client() as client:
            state = client.state()
        workers = [
            psutil.Process(row["pid"])
            for row_list in (b["instances"] for b in state["brokers"].values())
            for row in row_list
            if row["pid"]
        ]
        assert daemon.stop() == 0, daemon.log_text()
        _, alive = psutil.wait_procs(workers, timeout=10)
        for process in alive:
            process.kill()
        assert not alive, f"workers outlived busd: {alive}"
    finally:
        daemon.kill()


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def ensure_running(connection: RawConnection) -> None:
    """Give every broker a RUNNING instance, so that a ``wait`` publish ends.

    The fuzzer may have stopped a broker or scaled it to 0: a message then
    waits in its queue, and ``publish`` with ``wait`` would never answer.
    """
    state = connection.request({"id": "s", "op": "state"})["result"]
    for name, (_, count) in BROKERS.items():
        rows = state["brokers"][name]["instances"]
        if any(row["state"] == "RUNNING" for row in rows):
            continue
        if rows:
            request = {"id": "r", "op": "broker_start", "broker": name}
        else:
            request = {"id": "r", "op": "scale", "broker": name, "instances": count}
        answer = connection.request(request)
        assert answer["ok"], answer
        running = [r for r in answer["result"]["instances"] if r["state"] == "RUNNING"]
        assert running, answer


def test_every_op_answers_any_arguments_with_a_result_or_a_typed_error(fuzzed):
    """Any op, any arguments: a result or a typed error, and busd still answers.

    Hypothesis draws a request it has drawn before only rarely, and the
    right broker requests are few (two brokers, instances 0 to 3): it tries
    most of them once (about 40 acted on in 2,000 examples), and the
    ``@example``s make sure that each broker op acts and refuses at least
    once and that a publish is acked by both brokers, whatever is drawn.
    """
    outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
    routed = 0  # publishes that reached one broker or more
    start_rss = rss(fuzzed.pid)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(request=requests)
    # Whatever is drawn, each broker op both acts and refuses at least once,
    # and a publish reaches the brokers.
    @example(request=("scale", {"broker": "beta", "instances": MAX_SCALE}))
    @example(request=("scale", {"broker": "alpha", "instances": 0}))
    @example(request=("scale", {"broker": "gamma", "instances": 1}))
    @example(request=("scale", {"broker": "alpha", "instances": MAX_INSTANCES + 1}))
    @example(request=("broker_start", {"broker": "alpha"}))
    @example(request=("broker_start", {"broker": "beta", "instance": MAX_SCALE}))
    @example(request=("broker_stop", {"broker": "beta", "instance": 0}))
    @example(request=("broker_stop", {"broker": "gamma"}))
    @example(request=("broker_restart", {"broker": "beta"}))
    @example(request=("broker_restart", {"broker": "alpha", "instance": MAX_SCALE}))
    @example(request=("publish", {"channel": "main", "message": "m", "wait": True}))
    @example(request=("publish", {"channel": "side", "message": [1, {"a": b"\0"}]}))
    @example(request=("shutdown", {"x": None}))
    @example(request=("reload", {"broker": "alpha"}))
    def one_request(request: tuple[str, dict[str, Any]]) -> None:
        nonlocal routed
        op, arguments = request
        arguments = capped(op, arguments)
        with RawConnection(fuzzed.socket) as connection:
            try:
                frame = encode_frame({"id": 1, "op": op, **arguments})
            except Exception:
                return  # a value msgpack cannot carry: nothing to send
            if op == "publish" and arguments.get("wait") is True:
                ensure_running(connection)
            connection.send_bytes(frame)
            answer = connection.receive()
            assert answer["id"] == 1
            if answer["ok"]:
                assert op not in REFUSED_ONLY, f"{op} {arguments} went through"
                outcomes[op, "ok"] += 1
                if op == "publish" and answer["result"]["brokers"]:
                    routed += 1
            else:
                assert answer["error"]["code"] in TYPED, answer
                assert answer["error"]["message"]
                outcomes[op, answer["error"]["code"]] += 1
            connection.send({"id": 2, "op": "ping"})
            while (reply := connection.receive()).get("id") != 2:
                pass  # stream events of the op above
            assert reply == {"id": 2, "ok": True, "result": "pong"}

    one_request()
    assert fuzzed.process.poll() is None, "busd died"
    # The fuzzed ops reached the supervisor and the router, not just "no broker".
    for op in ("broker_start", "broker_stop", "broker_restart", "scale"):
        assert outcomes[op, "ok"] and outcomes[op, "not_found"], outcomes
    assert routed, outcomes
    with RawConnection(fuzzed.socket) as connection:
        ensure_running(connection)
        state = connection.request({"id": 3, "op": "state"})["result"]
    acked = {name: state["brokers"][name]["acked"] for name in BROKERS}
    assert all(acked.values()), acked
    grown = rss(fuzzed.pid) - start_rss
    assert grown < RSS_GROWTH_BOUND, f"RSS grew by {grown} bytes"
    assert "Traceback" not in fuzzed.log_text()
    broker_ops = "; ".join(
        f"{op} "
        + ", ".join(
            f"{n} {o}" for (o_op, o), n in sorted(outcomes.items()) if o_op == op
        )
        for op in ("broker_start", "broker_stop", "broker_restart", "scale")
    )
    print(
        f"\n{sum(outcomes.values())} requests: "
        f"{sum(c for (_, o), c in outcomes.items() if o == 'ok')} results, "
        f"{sum(c for (_, o), c in outcomes.items() if o != 'ok')} typed errors; "
        f"{broker_ops}; {routed} publishes routed to brokers, acked {acked}; "
        f"RSS +{grown >> 10} KiB"
    )


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
    connections = 0
    while sent < MUTATED_FRAMES:
        connections += 1
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
    assert grown < RSS_GROWTH_BOUND, f"RSS grew by {grown} bytes over {sent} frames"
    assert "Traceback" not in fuzzed.log_text()
    print(
        f"\n{sent} mutated frames over {connections} connections, "
        f"{closed} cut by busd, RSS +{grown >> 10} KiB"
    )
