"""The broker protocol (docs/broker-protocol.md), spoken by brokers busd did not write.

- examples/plain_broker.py, msgpack and the stdlib only, run by a real busd:
  acks, nacks to the ``dead`` channel, log lines, a clean stop;
- a probe broker that reports the environment and parent-death signal the
  document promises;
- ``python -m busd.worker`` driven by hand over its pipes: the protocol by
  example, frame by frame;
- examples/node-broker, when ``node`` is installed;
- busd's side: WorkerStdout, the reader of a worker's stdout, on a real
  event loop and a real child process: frames split across reads, and a
  broken frame.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import RunningDaemon, wait_for

from busd.protocol import FrameDecoder, ProtocolError, encode_frame
from busd.supervision.pipes import WorkerStdout

REPO = Path(__file__).resolve().parents[1]
PLAIN_BROKER = REPO / "examples" / "plain_broker.py"
NODE_BROKER = REPO / "examples" / "node-broker"

# Generous for a loaded 2-core machine; each wait normally takes milliseconds.
DEADLINE = 10.0

MAX_RETRIES = 1

# A broker that only tells what busd gave it: its environment, its parent,
# the signal it gets when busd dies. Then it waits for "stop" or EOF.
PROBE = """
import ctypes, json, os, struct, sys
import msgpack
signum = ctypes.c_int()
ctypes.CDLL(None).prctl(2, ctypes.byref(signum), 0, 0, 0)  # PR_GET_PDEATHSIG
names = ["BUSD_PID", "BUSD_BROKER", "BUSD_INSTANCE", "BUSD_DAEMON", "PROBE_VAR"]
facts = {name: os.environ.get(name) for name in names}
facts.update(pdeathsig=signum.value, ppid=os.getppid(), pid=os.getpid())
print("probe " + json.dumps(facts), file=sys.stderr, flush=True)
body = msgpack.packb({"type": "ready", "pid": os.getpid()})
sys.stdout.buffer.write(struct.pack(">I", len(body)) + body)
sys.stdout.buffer.flush()
sys.stdin.buffer.read()
"""


# A broker that answers each read's deliveries with one "ids" ack, after
# two acks busd must ignore (and log) without losing its footing.
BATCHER = """
import os, struct, sys
import msgpack
def send(frame):
    body = msgpack.packb(frame)
    sys.stdout.buffer.write(struct.pack(">I", len(body)) + body)
    sys.stdout.buffer.flush()
send({"type": "ready", "pid": os.getpid()})
unpacker = msgpack.Unpacker()
buffer = b""
while data := os.read(0, 1 << 16):
    buffer += data
    ids = []
    while len(buffer) >= 4 and len(buffer) >= 4 + struct.unpack(">I", buffer[:4])[0]:
        size = struct.unpack(">I", buffer[:4])[0]
        frame = msgpack.unpackb(buffer[4 : 4 + size])
        buffer = buffer[4 + size :]
        if frame["type"] == "stop":
            sys.exit(0)
        ids.append(frame["id"])
    send({"type": "ack", "ids": "all of them"})
    send({"type": "ack", "ids": [[1], "x", None, True, 10**12]})
    send({"type": "ack", "ids": ids})
"""


# busd runs every broker as ``python -m busd.worker --exec -- ...``; with a
# command broker busd adds nothing to PYTHONPATH, so the worker must come
# from the working tree under test, not from whatever busd .venv holds.
WORKING_TREE = {"PYTHONPATH": str(REPO)}


def config_text(**brokers: list[str]) -> str:
    """A config with one ``command`` broker per keyword, on channel main."""
    tables = []
    for name, command in brokers.items():
        tables.append(
            f"[brokers.{name}]\n"
            f"command = {json.dumps(command)}\n"
            'channels = ["main"]\n'
            f"max_retries = {MAX_RETRIES}\n"
            "stop_timeout = 5\n"
            'env = { PROBE_VAR = "from the config" }\n'
        )
    return "\n".join(tables)


def instance_pid(daemon: RunningDaemon, broker: str) -> int:
    """The PID of ``broker``'s instance 0 once it is RUNNING."""

    def running() -> int | None:
        with daemon.client() as client:
            row = client.state()["brokers"][broker]["instances"][0]
        return row["pid"] if row["state"] == "RUNNING" else None

    try:
        return int(wait_for(running, DEADLINE, f"{broker}:0 to be RUNNING"))
    except AssertionError as error:
        raise AssertionError(f"{error}; busd's log:\n{daemon.log_text()}") from None


def log_messages(daemon: RunningDaemon, source: str) -> list[dict[str, Any]]:
    with daemon.client() as client:
        return client.logs(lines=200, source=source)["lines"]


def has_log(daemon: RunningDaemon, source: str, text: str) -> bool:
    return any(text in entry["message"] for entry in log_messages(daemon, source))


def stop_and_check(daemon: RunningDaemon, broker_pids: list[int]) -> None:
    """Shut busd down; every broker stopped on its "stop" frame, exit 0."""
    descendants = psutil.Process(daemon.pid).children(recursive=True)
    everyone = [*broker_pids, daemon.fork_server_pid()]
    assert sorted(p.pid for p in descendants) == sorted(everyone)
    assert daemon.stop() == 0, daemon.log_text()
    _, alive = psutil.wait_procs(descendants, timeout=DEADLINE)
    assert not alive, f"left running: {alive}"
    log = daemon.log_text()
    for pid in broker_pids:
        assert f"(PID {pid}): stopped (exit status 0)" in log, log
    assert "still running after the stop request" not in log, log


# -- examples/plain_broker.py under busd -------------------------------------


@pytest.fixture
def plain(start_busd: Callable[..., RunningDaemon]) -> RunningDaemon:
    return start_busd(
        config_text(plain=[sys.executable, str(PLAIN_BROKER)]), env=WORKING_TREE
    )


def test_plain_broker_acks_strings_and_logs_them(plain: RunningDaemon) -> None:
    pid = instance_pid(plain, "plain")
    with plain.client() as client:
        result = client.call(
            "publish", channel="main", message="BUY ABCD 10", wait=True
        )
        assert result["brokers"] == 1
        assert (result["acked"], result["dead"]) == (1, 0)
        entries = client.logs(source="plain")["lines"]
    got = [e for e in entries if e["message"] == "got BUY ABCD 10 on main"]
    assert len(got) == 1, entries
    assert (got[0]["level"], got[0]["pid"], got[0]["instance"]) == ("info", pid, 0)
    stop_and_check(plain, [pid])


def test_plain_broker_nacks_non_strings_into_the_dead_channel(
    plain: RunningDaemon,
) -> None:
    pid = instance_pid(plain, "plain")
    with plain.client() as watcher, plain.client() as client:
        dead = watcher.subscribe("dead")
        result = client.call("publish", channel="main", message=[1, 2], wait=True)
        assert (result["acked"], result["dead"]) == (0, 1)
        letter = dead.next_event(timeout=DEADLINE)
    assert letter["channel"] == "dead"
    error = "TypeError: expected a string, got list"
    assert letter["message"] == {
        "broker": "plain",
        "id": result["id"],
        "channel": "main",
        "message": [1, 2],
        "attempts": MAX_RETRIES + 1,
        "errors": [error] * (MAX_RETRIES + 1),
        "letter": 1,  # its id in the dead-letter store
    }
    # The broker's "ERROR: " prefix became the level of its lines.
    failures = [e for e in log_messages(plain, "plain") if error in e["message"]]
    assert [(e["level"], e["message"]) for e in failures] == [
        ("error", f"attempt {n}: {error}") for n in range(1, MAX_RETRIES + 2)
    ]
    # A string after the failures still goes through: the broker is fine.
    with plain.client() as client:
        result = client.call(
            "publish", channel="main", message="SELL WXYZ 3", wait=True
        )
    assert (result["acked"], result["dead"]) == (1, 0)
    stop_and_check(plain, [pid])


def test_busd_gives_a_broker_its_environment_and_parent_death_signal(
    start_busd: Callable[..., RunningDaemon],
) -> None:
    daemon = start_busd(
        config_text(probe=[sys.executable, "-c", PROBE]), env=WORKING_TREE
    )
    pid = instance_pid(daemon, "probe")
    wait_for(lambda: has_log(daemon, "probe", "probe "), DEADLINE, "the probe line")
    line = next(
        e["message"]
        for e in log_messages(daemon, "probe")
        if e["message"][:6] == "probe "
    )
    facts = json.loads(line.removeprefix("probe "))
    assert facts == {
        "BUSD_PID": str(daemon.pid),
        "BUSD_BROKER": "probe",
        "BUSD_INSTANCE": "0",
        "BUSD_DAEMON": daemon.socket,
        "PROBE_VAR": "from the config",
        "pdeathsig": signal.SIGTERM,
        # Forked by busd's fork server, then adopted by busd, whose death
        # ends it (pdeathsig); the fork server's does not.
        "ppid": daemon.pid,
        "pid": pid,
    }
    stop_and_check(daemon, [pid])


def test_a_broker_may_ack_several_messages_in_one_frame(
    start_busd: Callable[..., RunningDaemon],
) -> None:
    daemon = start_busd(
        config_text(batcher=[sys.executable, "-c", BATCHER]), env=WORKING_TREE
    )
    pid = instance_pid(daemon, "batcher")
    with daemon.client() as client:
        results = client.publish_many("main", range(500), window=200, wait=True)
        broker = client.state()["brokers"]["batcher"]
    assert [(r["acked"], r["dead"]) for r in results] == [(1, 0)] * 500
    assert (broker["acked"], broker["instances"][0]["inflight"]) == (500, 0)
    log = daemon.log_text()
    assert "ignoring an ack whose 'ids' is not a list" in log, log
    stop_and_check(daemon, [pid])


# -- busd.worker by hand: the protocol frame by frame --------------------------


class Pipes:
    """A broker process driven over its pipes, every read under a deadline."""

    def __init__(self, command: list[str], **popen: Any) -> None:
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            **popen,
        )
        self.decoder = FrameDecoder(64 << 20)
        self.frames: list[Any] = []

    def send(self, frame: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(encode_frame(frame))
        self.process.stdin.flush()

    def send_many(self, frames: list[dict[str, Any]]) -> None:
        """Write several frames at once, so that the broker reads them together."""
        assert self.process.stdin is not None
        self.process.stdin.write(b"".join(encode_frame(f) for f in frames))
        self.process.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + DEADLINE
        while not self.frames:
            left = deadline - time.monotonic()
            readable, _, _ = select.select([fd], [], [], max(0.0, left))
            assert readable, f"no frame within {DEADLINE} s"
            data = os.read(fd, 1 << 16)
            assert data, "the broker closed stdout"
            self.frames += self.decoder.feed(data)
        return self.frames.pop(0)

    def finish(self) -> tuple[int, str]:
        """Wait for the exit; return the status and everything on stderr."""
        assert self.process.stdin is not None and self.process.stderr is not None
        self.process.stdin.close()
        status = self.process.wait(DEADLINE)
        return status, self.process.stderr.read().decode()

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None and not stream.closed:
                stream.close()


@pytest.fixture
def pipes() -> Iterator[Callable[..., Pipes]]:
    started: list[Pipes] = []

    def start(command: list[str], **popen: Any) -> Pipes:
        started.append(Pipes(command, **popen))
        return started[-1]

    yield start
    for broker in started:
        broker.kill()


def test_worker_speaks_the_protocol_frame_by_frame(
    pipes: Callable[..., Pipes],
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUSD_")}
    env["PYTHONPATH"] = str(REPO)
    worker = pipes(
        [
            sys.executable,
            "-m",
            "busd.worker",
            "--handler",
            "examples.stock:OrderBroker",
        ],
        cwd=REPO,
        env=env,
    )
    ready = worker.receive()
    assert ready == {"type": "ready", "pid": worker.process.pid}

    deliver = {"type": "deliver", "channel": "main", "redelivered": False, "attempt": 1}
    worker.send({**deliver, "id": 1, "message": "BUY ABCD 10"})
    assert worker.receive() == {"type": "ack", "id": 1}

    worker.send({**deliver, "id": 2, "message": "HOLD ABCD"})
    nack = worker.receive()
    assert (nack["type"], nack["id"]) == ("nack", 2)
    assert nack["error"].startswith("ValueError: not an order"), nack

    # Quick messages that arrive in one read are acknowledged in one frame.
    worker.send_many(
        [{**deliver, "id": n, "message": f"SELL ABCD {n}"} for n in (3, 4, 5)]
    )
    assert worker.receive() == {"type": "ack", "ids": [3, 4, 5]}

    worker.send({"type": "stop"})
    status, stderr = worker.finish()
    assert status == 0, stderr
    assert "BUY order placed for 10 ABCD" in stderr


# -- examples/node-broker ----------------------------------------------------------


@pytest.fixture
def node_broker(tmp_path: Path) -> Path:
    """examples/node-broker copied to a temp dir, its npm dependency installed."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the JavaScript broker cannot run")
    npm = shutil.which("npm")
    assert npm is not None, "node is installed but npm is not: install npm"
    directory = tmp_path / "node-broker"
    directory.mkdir()
    for name in ("package.json", "package-lock.json", "broker.js"):
        shutil.copy(NODE_BROKER / name, directory / name)
    # npm ci installs exactly the locked version, checked against its hash.
    install = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--prefer-offline"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert install.returncode == 0, f"npm ci failed:\n{install.stderr}"
    return directory / "broker.js"


def test_node_broker(
    node_broker: Path, start_busd: Callable[..., RunningDaemon]
) -> None:
    node = shutil.which("node")
    assert node is not None
    daemon = start_busd(config_text(node=[node, str(node_broker)]), env=WORKING_TREE)
    pid = instance_pid(daemon, "node")
    with daemon.client() as client:
        result = client.call(
            "publish", channel="main", message="BUY ABCD 10", wait=True
        )
        assert (result["acked"], result["dead"]) == (1, 0)
        result = client.call("publish", channel="main", message=7, wait=True)
        assert (result["acked"], result["dead"]) == (0, 1)
    assert has_log(daemon, "node", "got BUY ABCD 10 on main")
    errors = [e for e in log_messages(daemon, "node") if e["level"] == "error"]
    assert [e["message"] for e in errors] == [
        f"attempt {n}: TypeError: expected a string, got number"
        for n in range(1, MAX_RETRIES + 2)
    ]
    stop_and_check(daemon, [pid])


# -- the worker's command line (written by busd) ------------------------------


def test_the_worker_command_line() -> None:
    from busd.worker import parse_arguments

    assert parse_arguments(
        ["--broker", "orders", "--instance=2", "--handler", "m:C"]
    ) == (
        {"--broker": "orders", "--instance": "2", "--handler": "m:C"},
        None,
    )
    options, command = parse_arguments(["--exec", "--", "node", "--flag", "x"])
    assert command == ["node", "--flag", "x"]
    assert options["--handler"] == ""
    for wrong, error in [
        ([], "give exactly one of --handler"),
        (["--handler", "m:C", "--exec", "prog"], "give exactly one of --handler"),
        (["--exec", "--"], "--exec needs a program"),
        (["--handler"], "--handler needs a value"),
        (["--instance", "two", "--handler", "m:C"], "--instance needs a number"),
        (["--verbose", "--handler", "m:C"], "unknown argument '--verbose'"),
    ]:
        with pytest.raises(ValueError, match=error):
            parse_arguments(wrong)


def test_a_wrong_worker_command_line_exits_2_with_usage() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "busd.worker", "--instance", "x", "--handler", "m:C"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=DEADLINE,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("usage: python -m busd.worker"), result.stderr
    assert "error: --instance needs a number, got 'x'" in result.stderr


# -- busd's side: WorkerStdout reading a worker's stdout -------------------------------


class Instance:
    """What WorkerStdout hands frames to (the real one needs a whole broker)."""

    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.broken: list[str] = []

    def frames_received(self, frames: list[Any]) -> None:
        self.frames += frames

    def broken_frame(self, error: ProtocolError) -> None:
        self.broken.append(error.message)


def read_child_stdout(*chunks: bytes) -> Instance:
    """Run a child that writes ``chunks`` to stdout, read as busd reads a
    worker's: WorkerStdout on a pipe of its own; return what it handed on."""

    async def scenario() -> Instance:
        loop = asyncio.get_running_loop()
        instance = Instance()
        script = "import sys, time\n" + "".join(
            f"sys.stdout.buffer.write({c!r}); sys.stdout.flush(); time.sleep(0.01)\n"
            for c in chunks
        )
        frames_out, frames_in = os.pipe()
        child = subprocess.Popen([sys.executable, "-c", script], stdout=frames_in)
        os.close(frames_in)
        try:
            stdout = WorkerStdout(instance.frames_received, instance.broken_frame)
            pipe = os.fdopen(frames_out, "rb", buffering=0)
            await loop.connect_read_pipe(lambda: stdout, pipe)
            await asyncio.wait_for(stdout.closed, DEADLINE)  # the child exited
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(DEADLINE)
        assert child.returncode == 0
        return instance

    return asyncio.run(scenario())


def test_frames_are_handed_on_as_they_come_even_split_across_reads() -> None:
    frames = encode_frame({"type": "ready", "pid": 1}) + encode_frame(
        {"type": "ack", "ids": [1, 2]}
    )
    instance = read_child_stdout(frames[:7], frames[7:20], frames[20:])
    assert instance.frames == [
        {"type": "ready", "pid": 1},
        {"type": "ack", "ids": [1, 2]},
    ]
    assert instance.broken == []


def test_after_a_broken_frame_the_rest_of_stdout_is_read_and_dropped() -> None:
    too_large = (100 << 20).to_bytes(4, "big")
    instance = read_child_stdout(too_large, encode_frame({"type": "ack", "id": 1}))
    # `closed` came: the pipe was read to its end, nothing more handed on.
    assert len(instance.broken) == 1 and "over the maximum" in instance.broken[0]
    assert instance.frames == []
