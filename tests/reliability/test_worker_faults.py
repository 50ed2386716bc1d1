"""Workers that misbehave on their pipes, and a busd that dies under them.

A worker's stdout is busd's frame protocol: garbage there is a broken frame
and the worker is SIGKILLed, while busd keeps answering. A worker flooding
its stderr is tested in tests/test_worker_output.py
(``test_worker_flooding_stderr_does_not_block_busd``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest
from helpers import broker, gone, records, rows, wait_for, wait_states

pytestmark = pytest.mark.reliability

LONG = os.environ.get("BUSD_LONG") == "1"
FLOOD_MEGABYTES = 64 if LONG else 8
# Sanity bounds, not figures (the figures are printed, and recorded in
# docs/reliability.md). A ping normally takes about a millisecond, 5 ms at
# most during the floods; one took 833 ms on a loaded 2-core machine in
# test_load. 5 s only fails if busd stops answering while it reads a flood.
PING_BOUND = 5.0
# How long a worker may outlive a SIGKILLed busd: 6-36 ms measured. 10 s
# only fails if the workers do not die with busd at all (no PDEATHSIG chain
# from busd to its fork server to them).
ORPHAN_BOUND = 10.0
# How long busd may take to notice that the worker it killed is gone
# (normally milliseconds): a sanity deadline, like wait_for's others.
EXIT_DEADLINE = 20.0

# A command broker that says "ready" then writes megabytes of garbage to its
# protocol pipe (fd 1). "garb" read as a length prefix is 1.7 GB, far over
# the worker frame limit, so busd must give up on the pipe at once.
FLOODER = """
import os, struct, sys
import msgpack
body = msgpack.packb({"type": "ready", "pid": os.getpid()})
os.write(1, struct.pack(">I", len(body)) + body)
chunk = b"garbage!" * (1 << 17)
for _ in range(int(sys.argv[1])):
    os.write(1, chunk)
sys.stdin.buffer.read()
"""


def command_broker(name: str, command: list[str]) -> str:
    return (
        f"[brokers.{name}]\n"
        f"command = {json.dumps(command)}\n"
        'channels = ["floods"]\n'
        "stop_timeout = 5\n"
        "start_retries = 4\n\n"  # FATAL after 5 failed starts in a row
    )


def test_a_worker_flooding_its_protocol_pipe_is_killed_and_busd_keeps_serving(
    start_busd, tmp_path
):
    record = tmp_path / "rec.jsonl"
    daemon = start_busd(
        command_broker("flood", [sys.executable, "-c", FLOODER, str(FLOOD_MEGABYTES)])
        + broker("rec", "brokers_for_tests:Recorder", record)
    )
    pings = 0
    slowest = 0.0

    def ping(pinger) -> None:
        nonlocal pings, slowest
        started = time.monotonic()
        assert pinger.ping() == "pong"
        slowest = max(slowest, time.monotonic() - started)
        pings += 1

    with daemon.client() as pinger, daemon.client() as watcher:
        wait_for(lambda: "broken frame" in daemon.log_text(), 10, "a broken frame")
        killed = rows(watcher, "flood")[0]["pid"]

        def moved_on() -> bool:
            ping(pinger)
            row = rows(watcher, "flood")[0]
            return row["state"] != "RUNNING" or row["pid"] != killed

        wait_for(
            moved_on,
            EXIT_DEADLINE,
            f"flood:0 to leave RUNNING after PID {killed} died",
        )
        # Each start floods again; five failed starts in a row end in FATAL.

        def fatal() -> bool:
            ping(pinger)
            return rows(watcher, "flood")[0]["state"] == "FATAL"

        wait_for(fatal, 20, "flood:0 to become FATAL")
        # Another broker was served all along.
        result = watcher.call("publish", channel="main", message="after", wait=True)
        assert result["acked"] == 1
    log = daemon.log_text()
    assert log.count("broken frame, stopping it") == 5, log
    assert "Traceback" not in log
    assert any(r["message"] == "after" for r in records(record))
    assert slowest < PING_BOUND, f"a ping took {slowest:.3f} s during the flood"
    print(f"\n{pings} pings during 5 floods, slowest {slowest * 1000:.1f} ms")
    assert daemon.stop() == 0


def test_workers_die_soon_after_busd_is_killed(start_busd):
    daemon = start_busd(broker("rec", "brokers_for_tests:Recorder", instances=2))
    with daemon.client() as client:
        pids = [r["pid"] for r in wait_states(client, "rec", ["RUNNING"] * 2)]
    killed = time.monotonic()
    os.kill(daemon.pid, signal.SIGKILL)
    wait_for(
        lambda: all(gone(pid) for pid in pids),
        ORPHAN_BOUND,
        f"workers {pids} to die",
    )
    print(f"\nworkers gone {time.monotonic() - killed:.3f} s after SIGKILL of busd")
    daemon.process.wait(10)
