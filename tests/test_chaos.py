"""Chaos: busd's children killed or frozen at random under a message stream.

A real busd runs a broker of two instances that records every delivery
(tests/brokers_for_tests.py, ``Recorder``). While 5,000 messages are
published, a child of busd picked at random among all its live children
(a worker or the fork server: none is spared) gets SIGKILL every 100 ms
for 3 s; or, in the second test, SIGSTOP, and SIGCONT after a random
time of up to twice the broker's ack_timeout (and at the end). Then, with
no operator action:

- every message is handled within 60 s of the end of the chaos, and
  acknowledged: none is lost, none stays stranded in the queue;
- a message handled more than once is flagged ``redelivered`` each time
  after the first (at-least-once, never a silent duplicate);
- no instance ever goes FATAL.

The figures (kills, time to drain, duplicates, restarts) are printed
(``pytest -s``) and recorded in docs/reliability.md. The restart policy
this relies on (restart for ever, with a capped back-off) is busd's
default: the config sets nothing about restarts.
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
from helpers import broker, records, wait_for, wait_records, wait_states

MESSAGES = 5000
#: The stream is spread over this long, so the chaos falls in its middle.
STREAM_SECONDS = 3.0
CHAOS_SECONDS = 3.0
CHAOS_EVERY = 0.1
STRIKES = round(CHAOS_SECONDS / CHAOS_EVERY)
#: The SIGSTOP test's ack_timeout: a frozen worker's messages move on.
FROZEN_ACK_TIMEOUT = 1.0
#: The promise: every message handled within this long after the chaos.
DRAIN_DEADLINE = 60.0


def chaos_config(record: Path, **settings: Any) -> str:
    return broker(
        "chaos",
        "brokers_for_tests:Recorder",
        record,
        instances=2,
        queue_size=MESSAGES + 1000,
        **settings,
    )


def publish_stream(client: Any, failures: list[BaseException]) -> None:
    """Publish MESSAGES numbered messages, paced over STREAM_SECONDS."""
    started = time.monotonic()

    def paced() -> Any:
        for number in range(MESSAGES):
            due = started + number * STREAM_SECONDS / MESSAGES
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # a rate, not a wait for a race
            yield {"n": number}

    try:
        client.publish_many("main", paced())
    except BaseException as error:  # reported by the test's thread join
        failures.append(error)


class Chaos:
    """Picks one of busd's live children at random, every CHAOS_EVERY s."""

    def __init__(self, busd_pid: int, action: str) -> None:
        self.busd = psutil.Process(busd_pid)
        self.action = action
        self.hits: Counter[str] = Counter()
        #: PID -> when it is continued (monotonic), for the frozen ones.
        self.stopped: dict[int, float] = {}
        self.random = random.Random()

    def run(self) -> None:
        started = time.monotonic()
        for strike in range(STRIKES):
            delay = started + strike * CHAOS_EVERY - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # the chaos's own rhythm
            self.strike()
        self.release()

    def strike(self) -> None:
        now = time.monotonic()
        for pid, until in list(self.stopped.items()):
            if until <= now:
                self.resume(pid)
        try:
            children = [c for c in self.busd.children() if c.is_running()]
            children = [c for c in children if c.status() != psutil.STATUS_ZOMBIE]
        except psutil.NoSuchProcess:
            children = []
        # A frozen child is not frozen again; every other one may be picked.
        children = [c for c in children if c.pid not in self.stopped]
        if not children:
            self.hits["none to pick"] += 1
            return
        victim = self.random.choice(children)
        try:
            # Workers are named after their instance (a fork server is
            # "python3" for a moment before it is "busd-forkserver").
            kind = "worker" if victim.name().startswith("chaos:") else "fork server"
            if self.action == "kill":
                victim.send_signal(signal.SIGKILL)
                self.hits[f"{kind} killed"] += 1
            else:
                victim.send_signal(signal.SIGSTOP)
                # Frozen for up to twice the ack_timeout: shorter freezes
                # only delay its messages, longer ones get it killed.
                hold = self.random.uniform(0, 2 * FROZEN_ACK_TIMEOUT)
                self.stopped[victim.pid] = now + hold
                self.hits[f"{kind} stopped"] += 1
        except psutil.NoSuchProcess:
            self.hits["gone before the signal"] += 1

    def resume(self, pid: int) -> None:
        self.stopped.pop(pid, None)
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).send_signal(signal.SIGCONT)

    def release(self) -> None:
        """SIGCONT every process this chaos stopped and that still runs."""
        for pid in list(self.stopped):
            self.resume(pid)


def run_chaos(start_busd: Any, tmp_path: Path, action: str, **settings: Any) -> dict:
    record = tmp_path / "handled.jsonl"
    daemon = start_busd(config_text=chaos_config(record, **settings))
    chaos: Chaos | None = None
    try:
        with daemon.client(timeout=60) as client:
            wait_states(client, "chaos", ["RUNNING"] * 2)
            chaos = Chaos(daemon.pid, action)
            failures: list[BaseException] = []
            with daemon.client(timeout=60) as publisher:
                stream = threading.Thread(
                    target=publish_stream, args=(publisher, failures)
                )
                stream.start()
                chaos.run()
                chaos_end = time.monotonic()
                stream.join(DRAIN_DEADLINE)
                assert not stream.is_alive(), "the stream never ended"
            assert not failures, failures

            def everything_handled(found: list[dict[str, Any]]) -> bool:
                return len({r["message"]["n"] for r in found}) == MESSAGES

            wait_records(record, everything_handled, DRAIN_DEADLINE, "all messages")
            drained = time.monotonic() - chaos_end

            def settled() -> dict[str, Any] | None:
                row = client.state()["brokers"]["chaos"]
                busy = row["queued"] or any(i["inflight"] for i in row["instances"])
                return None if busy else row

            row = wait_for(settled, DRAIN_DEADLINE, "the queue to empty")
            restarts = [i["restarts"] for i in row["instances"]]
    finally:
        if chaos is not None:
            chaos.release()
    found = records(record)
    handled = Counter(r["message"]["n"] for r in found)
    log = daemon.log_text()
    figures = {
        "action": action,
        "hits": dict(chaos.hits),
        "drained_after": round(drained, 2),
        "records": len(found),
        "duplicates": sum(count - 1 for count in handled.values()),
        "redelivered": sum(bool(r["redelivered"]) for r in found),
        "restarts": restarts,
        "fork_server_restarts": log.count("The fork server is back"),
    }
    print(f"\nchaos figures: {figures}")
    assert sorted(handled) == list(range(MESSAGES))
    assert (row["accepted"], row["acked"], row["dead"]) == (MESSAGES, MESSAGES, 0)
    # A duplicate is never silent: each delivery after the first is flagged.
    seen: set[int] = set()
    for line in found:
        number = line["message"]["n"]
        if number in seen:
            assert line["redelivered"] is True, line
        seen.add(number)
    assert "FATAL" not in log, log
    # Both instances come back by themselves (one may be in its back-off).
    with daemon.client(timeout=60) as client:
        wait_states(client, "chaos", ["RUNNING"] * 2, DRAIN_DEADLINE)
    assert daemon.stop() == 0, log
    return figures


def test_random_children_of_busd_killed_under_a_stream_lose_nothing(
    start_busd, tmp_path
):
    figures = run_chaos(start_busd, tmp_path, "kill")
    assert figures["hits"].get("worker killed", 0) > 0, figures


def test_random_children_of_busd_frozen_under_a_stream_lose_nothing(
    start_busd, tmp_path
):
    # A frozen worker holds its messages until ack_timeout moves them on.
    figures = run_chaos(
        start_busd, tmp_path, "stop", ack_timeout=FROZEN_ACK_TIMEOUT, max_retries=20
    )
    assert figures["hits"].get("worker stopped", 0) > 0, figures
