"""Brokers under a real busd: delivery, failures, supervision, no orphans.

Every test starts a real daemon (``start_busd``) whose brokers are real
worker processes: ``examples.stock:OrderBroker`` or the brokers of
tests/brokers_for_tests.py, which append what they get to a file named by
their ``RECORD`` variable. Tests read those files, ``state``, the logs and
the ``events`` stream back, always with a deadline.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import psutil
from helpers import (
    STARTUP_DEADLINE,
    answers,
    broker,
    broker_events,
    collect,
    gone,
    log_lines,
    messages_of,
    records,
    rows,
    wait_for,
    wait_records,
    wait_states,
)

from busctl.client import BusError, Client
from busd.instance import FAST_FAILURE_SECONDS, MAX_FAST_FAILURES, MAX_LOG_LINE

BUSCTL = [sys.executable, "-m", "busctl"]
BUSD_RUN = [sys.executable, "-m", "busd", "run"]


# -- 1. the seed flow ------------------------------------------------------------------


def test_order_from_busctl_is_carried_out_and_logged(start_busd):
    daemon = start_busd(
        config_text=broker("orders", "examples.stock:OrderBroker", instances=2)
    )
    published = subprocess.run(
        [*BUSCTL, "--socket", daemon.socket, "publish", "main", "BUY ABCD 10"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert published.returncode == 0, published.stderr
    assert "(1 brokers, 0 subscribers)" in published.stdout
    with daemon.client() as client:
        pids = {r["index"]: r["pid"] for r in rows(client, "orders")}

        def placed() -> list[dict[str, Any]]:
            return [
                e
                for e in log_lines(client, "orders")
                if e["message"] == "BUY order placed for 10 ABCD"
            ]

        (entry,) = wait_for(placed, 15, "the order in `logs --source orders`")
        assert entry["pid"] == pids[entry["instance"]]
        assert entry["level"] == "info"
    expected = (
        f"orders:{entry['instance']}[{entry['pid']}] BUY order placed for 10 ABCD"
    )
    wait_for(lambda: expected in daemon.log_text(), 10, f"{expected!r} in busd.log")


# -- 2. fan-out and round-robin --------------------------------------------------------


def test_fan_out_to_brokers_and_round_robin_across_instances(start_busd, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    daemon = start_busd(
        config_text=broker("a", "brokers_for_tests:Recorder", a, instances=2)
        + broker("b", "brokers_for_tests:Recorder", b, instances=1)
    )
    with daemon.client() as client:
        results = client.publish_many("main", range(40))
        assert all(r["brokers"] == 2 for r in results)
        waited = client.call("publish", channel="main", message=40, wait=True)
        assert (waited["brokers"], waited["acked"], waited["dead"]) == (2, 2, 0)
    everything = list(range(41))
    for path in (a, b):
        found = wait_records(path, lambda r: sorted(messages_of(r)) == everything)
        assert not any(r["redelivered"] for r in found)
    per_instance = collections.Counter(r["instance"] for r in records(a))
    # Both instances always had room, so round-robin alternates strictly.
    assert set(per_instance) == {0, 1}
    assert abs(per_instance[0] - per_instance[1]) <= 1, per_instance
    assert {r["instance"] for r in records(b)} == {0}


def test_worker_publishes_upstream_to_other_brokers(start_busd, tmp_path):
    echoes = tmp_path / "echo.jsonl"
    daemon = start_busd(
        config_text=broker("up", "brokers_for_tests:Upstream", channels=("up",))
        + broker("echo", "brokers_for_tests:Recorder", echoes, channels=("echo",))
    )
    with daemon.client() as listener, daemon.client() as client:
        stream = listener.subscribe("echo")
        client.publish("up", "hello")
        assert stream.next_event(15) == {
            "channel": "echo",
            "message": {"echo": "hello"},
        }
    found = wait_records(echoes, lambda r: len(r) >= 1)
    assert messages_of(found) == [{"echo": "hello"}]
    assert found[0]["channel"] == "echo"


# -- 3. ack, nack, retry, dead ---------------------------------------------------------


def test_failing_message_is_retried_then_dead(start_busd, tmp_path):
    flaky = tmp_path / "flaky.jsonl"
    daemon = start_busd(
        config_text=broker("orders", "examples.stock:OrderBroker", max_retries=2)
        + broker(
            "flaky",
            "brokers_for_tests:FailTimes",
            flaky,
            channels=("flaky",),
            instances=2,
            max_retries=3,
        )
    )
    with daemon.client() as listener, daemon.client() as client:
        dead = listener.subscribe("dead")
        result = client.call("publish", channel="main", message="BUY 12 X", wait=True)
        assert (result["acked"], result["dead"]) == (0, 1)
        letter = dead.next_event(10)
        assert letter["channel"] == "dead"
        body = letter["message"]
        assert body["broker"] == "orders"
        assert body["id"] == result["id"]
        assert (body["channel"], body["message"]) == ("main", "BUY 12 X")
        assert body["attempts"] == 3
        assert len(body["errors"]) == 3
        assert all(
            "ValueError: not an order of the form" in error for error in body["errors"]
        )

        # Fails twice, then succeeds: acked, on whichever instance retries.
        result = client.call("publish", channel="flaky", message={"fail": 2}, wait=True)
        assert (result["acked"], result["dead"]) == (1, 0)
        # Fails more often than max_retries allows: dead after 4 attempts.
        result = client.call("publish", channel="flaky", message={"fail": 9}, wait=True)
        assert (result["acked"], result["dead"]) == (0, 1)
        assert dead.next_event(10)["message"]["attempts"] == 4

        state = client.state()["brokers"]
        assert (state["orders"]["dead"], state["orders"]["retried"]) == (1, 2)
        assert (state["flaky"]["acked"], state["flaky"]["dead"]) == (1, 1)
        assert state["flaky"]["retried"] == 2 + 3

    attempts = [(r["message"]["fail"], r["attempt"]) for r in records(flaky)]
    assert attempts == [(2, 1), (2, 2), (2, 3), (9, 1), (9, 2), (9, 3), (9, 4)]
    # A retry after a nack is not a redelivery: no instance died.
    assert not any(r["redelivered"] for r in records(flaky))
    log = daemon.log_text()
    assert "(attempt 1 of 3), retrying: ValueError: not an order" in log
    assert "failed 3 times; sent to the 'dead' channel" in log
    assert "failed 4 times; sent to the 'dead' channel" in log


# -- 4. at-least-once while workers are killed -----------------------------------------

KILL_STREAM = 10_000


def test_every_message_survives_workers_killed_every_100_ms(start_busd, tmp_path):
    """SIGKILL a RUNNING instance every 100 ms while 10,000 messages stream.

    The killer never makes an instance FATAL: it kills an instance that has
    been running for less than FAST_FAILURE_SECONDS (a fast failure, as
    busd counts them) only while that instance has fast failures to spare.
    """
    path = tmp_path / "kill.jsonl"
    daemon = start_busd(
        config_text=broker(
            "rec",
            "brokers_for_tests:Slow",
            path,
            # Slow enough that the stream lasts seconds, with kills all along.
            env={"SLEEP": "0.0005"},
            instances=2,
            queue_size=KILL_STREAM + 1,
        )
    )
    done = threading.Event()
    kills: list[int] = []
    killer_errors: list[BaseException] = []

    def killer() -> None:
        first_seen: dict[int, float] = {}  # PID -> when first seen RUNNING
        fast_kills: dict[int, int] = {}  # instance -> fast kills in a row
        try:
            with daemon.client() as client:
                while not done.wait(0.1):
                    now = time.monotonic()
                    candidates = []
                    for row in rows(client, "rec"):
                        if row["state"] != "RUNNING" or not row["pid"]:
                            continue
                        ran = now - first_seen.setdefault(row["pid"], now)
                        fast = ran < FAST_FAILURE_SECONDS + 0.5
                        in_a_row = fast_kills.get(row["index"], 0)
                        if not fast or in_a_row < MAX_FAST_FAILURES - 1:
                            candidates.append((row, fast))
                    if not candidates:
                        continue
                    row, fast = candidates[len(kills) % len(candidates)]
                    try:
                        os.kill(row["pid"], signal.SIGKILL)
                    except ProcessLookupError:
                        # It died between the state answer and the kill
                        # (an earlier kill still being reaped): next round.
                        continue
                    kills.append(row["pid"])
                    index = row["index"]
                    fast_kills[index] = fast_kills.get(index, 0) + 1 if fast else 1
        except BaseException as error:
            killer_errors.append(error)

    started = time.monotonic()
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        with daemon.client(timeout=30) as client:
            results = client.publish_many("main", range(KILL_STREAM), window=128)
            assert len(results) == KILL_STREAM
            published = time.monotonic()
            found = wait_records(
                path,
                lambda r: len(set(messages_of(r))) == KILL_STREAM,
                timeout=45,
                what=f"all {KILL_STREAM} messages recorded",
            )
    finally:
        done.set()
        thread.join(10)
    finished = time.monotonic()
    assert not killer_errors, killer_errors
    assert len(kills) >= 5, kills
    assert sorted(set(messages_of(found))) == list(range(KILL_STREAM))
    first_deliveries = collections.Counter(
        r["message"] for r in found if not r["redelivered"]
    )
    assert max(first_deliveries.values()) == 1, "a duplicate not flagged redelivered"
    duplicates = len(found) - KILL_STREAM
    with daemon.client() as client:
        state = wait_for(
            lambda: (
                (s := client.state()["brokers"]["rec"])["acked"] == KILL_STREAM and s
            ),
            20,
            "every message acknowledged",
        )
    assert state["queued"] == 0
    assert state["redelivered"] > 0  # kills hit messages in flight
    assert all(
        row["state"] in ("RUNNING", "BACKOFF", "STARTING") for row in state["instances"]
    )
    print(
        f"\n{KILL_STREAM} messages, {len(kills)} kills, {duplicates} duplicates, "
        f"{state['redelivered']} redelivered; published in "
        f"{published - started:.1f} s, all recorded after {finished - started:.1f} s"
    )


# -- 5. backpressure -------------------------------------------------------------------


def test_full_queue_answers_busy_and_loses_nothing(start_busd, tmp_path):
    path = tmp_path / "slow.jsonl"
    daemon = start_busd(
        config_text=broker(
            "slow",
            "brokers_for_tests:Slow",
            path,
            env={"SLEEP": "0.5"},
            queue_size=2,
            max_inflight=1,
        )
    )
    accepted: list[int] = []
    refused: list[int] = []
    with daemon.client() as client:
        for number in range(20):
            try:
                client.publish("main", number)
            except BusError as error:
                assert error.code == "busy"
                assert "queue_size 2" in error.message
                refused.append(number)
                break
            accepted.append(number)
        assert refused, "the queue never filled"
        # Refused with at most one message in the worker and two queued.
        assert len(accepted) - len(records(path)) <= 3

        def drained() -> bool:
            state = client.state()["brokers"]["slow"]
            return state["queued"] == 0 and state["instances"][0]["inflight"] == 0

        wait_for(drained, 20, "the slow broker to drain its queue")
        client.publish("main", 100)
        accepted.append(100)
    found = wait_records(path, lambda r: sorted(messages_of(r)) == sorted(accepted))
    assert refused[0] not in messages_of(found)


# -- 6. FATAL after fast crashes -------------------------------------------------------


def test_crash_at_start_becomes_fatal_and_start_tries_again(start_busd):
    daemon = start_busd(config_text=broker("crashy", "brokers_for_tests:CrashAtStart"))
    with daemon.client() as client:
        (row,) = wait_states(client, "crashy", ["FATAL"])
        assert row["last_exit"] == "exit status 3"
        assert row["pid"] is None
        assert row["restarts"] == MAX_FAST_FAILURES - 1
    assert "crashy:0: FATAL after 5 fast failures in a row" in daemon.log_text()

    with daemon.client(timeout=30) as watcher, daemon.client(timeout=30) as client:
        stream = watcher.events()
        client.call("broker_start", broker="crashy")
        events: list[dict[str, Any]] = []
        collect(stream, events, lambda e: "FATAL" in broker_events(e, "crashy"))
        states = broker_events(events, "crashy")
        assert states == ["STARTING", "BACKOFF"] * (MAX_FAST_FAILURES - 1) + [
            "STARTING",
            "FATAL",
        ]
        assert all(e["instance"] == 0 for e in events if e.get("broker"))
        (row,) = wait_states(client, "crashy", ["FATAL"])
        assert row["restarts"] == 2 * (MAX_FAST_FAILURES - 1)


# -- 7. scale and per-instance lifecycle -----------------------------------------------


def test_scale_and_start_stop_restart_instances(start_busd, tmp_path):
    path = tmp_path / "pool.jsonl"
    daemon = start_busd(
        config_text=broker("pool", "brokers_for_tests:Recorder", path, instances=1)
    )
    with daemon.client(timeout=30) as client:
        described = client.call("scale", broker="pool", instances=3)
        assert [r["state"] for r in described["instances"]] == ["RUNNING"] * 3
        pids = [r["pid"] for r in described["instances"]]
        assert len(set(pids)) == 3
        for number in range(9):
            client.call("publish", channel="main", message=number, wait=True)
        assert {r["pid"] for r in records(path)} == set(pids)

        described = client.call("scale", broker="pool", instances=1)
        assert [r["pid"] for r in described["instances"]] == pids[:1]
        wait_for(lambda: gone(pids[1]) and gone(pids[2]), 10, "scaled-down workers")

        client.call("scale", broker="pool", instances=2)
        first, second = (r["pid"] for r in wait_states(client, "pool", ["RUNNING"] * 2))
        assert first == pids[0]

        # One instance: stop, start, restart.
        client.call("broker_stop", broker="pool", instance=1)
        stopped = wait_states(client, "pool", ["RUNNING", "STOPPED"])
        assert stopped[0]["pid"] == first and stopped[1]["pid"] is None
        wait_for(lambda: gone(second), 10, "the stopped worker")
        result = client.call("publish", channel="main", message="one", wait=True)
        assert result["acked"] == 1
        client.call("broker_start", broker="pool", instance=1)
        restarted = wait_states(client, "pool", ["RUNNING"] * 2)
        assert restarted[0]["pid"] == first
        assert restarted[1]["pid"] not in (None, second)
        second = restarted[1]["pid"]
        client.call("broker_restart", broker="pool", instance=0)
        restarted = wait_states(client, "pool", ["RUNNING"] * 2)
        assert restarted[0]["pid"] not in (None, first)
        assert restarted[1]["pid"] == second
        wait_for(lambda: gone(first), 10, "the restarted worker's old process")

        # All instances at once.
        before = [r["pid"] for r in restarted]
        client.call("broker_stop", broker="pool")
        wait_states(client, "pool", ["STOPPED"] * 2)
        wait_for(lambda: all(gone(pid) for pid in before), 10, "stopped workers")
        client.call("broker_start", broker="pool")
        started = wait_states(client, "pool", ["RUNNING"] * 2)
        client.call("broker_restart", broker="pool")
        restarted = wait_states(client, "pool", ["RUNNING"] * 2)
        assert not {r["pid"] for r in restarted} & {r["pid"] for r in started}
        result = client.call("publish", channel="main", message="last", wait=True)
        assert result["acked"] == 1

        try:
            client.call("broker_stop", broker="pool", instance=5)
        except BusError as error:
            assert error.code == "not_found"
        else:
            raise AssertionError("instance 5 of 2 was accepted")


# -- 8. stop escalation ----------------------------------------------------------------


def test_worker_ignoring_stop_and_sigterm_is_killed(start_busd, tmp_path):
    path = tmp_path / "stubborn.jsonl"
    daemon = start_busd(
        config_text=broker(
            "stubborn", "brokers_for_tests:Stubborn", path, stop_timeout=1.0
        )
    )
    with daemon.client() as client:
        (row,) = wait_states(client, "stubborn", ["RUNNING"])
    pid = row["pid"]
    wait_records(path, lambda r: {"event": "start", "pid": pid} in r)
    os.kill(pid, signal.SIGTERM)  # ignored: still there for the next request
    with daemon.client() as client:
        assert rows(client, "stubborn")[0]["pid"] == pid
    started = time.monotonic()
    assert daemon.stop() == 0
    took = time.monotonic() - started
    assert gone(pid)
    assert {"event": "stop", "pid": pid} in records(path)  # it was asked first
    log = daemon.log_text()
    assert "still running after the stop request; sending SIGTERM" in log
    assert "still running after the stop request; sending SIGKILL" in log
    assert "stopped (killed by SIGKILL)" in log
    assert 0.9 <= took < 10, took
    assert not [
        p
        for p in psutil.process_iter(["environ"])
        if (p.info["environ"] or {}).get("BUSD_DAEMON") == daemon.socket
    ]


# -- 9. no orphans after busd is killed ------------------------------------------------


def launch_again(daemon: Any) -> subprocess.Popen[bytes]:
    """Start busd again with the same config, socket and PID file."""
    with open(daemon.log, "ab") as log_file:
        return subprocess.Popen(
            [
                *BUSD_RUN,
                *("--config", str(daemon.config), "--socket", daemon.socket),
                *("--pidfile", daemon.pidfile),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )


def test_workers_die_with_a_killed_busd_which_then_starts_again(start_busd, tmp_path):
    path = tmp_path / "rec.jsonl"
    daemon = start_busd(
        config_text=broker("rec", "brokers_for_tests:Recorder", path, instances=2)
    )
    with daemon.client() as client:
        pids = [r["pid"] for r in wait_states(client, "rec", ["RUNNING"] * 2)]
        pids.append(client.state()["fork_server"])
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.process.wait(10)
    wait_for(lambda: all(gone(pid) for pid in pids), 2.0, f"{pids} to die")

    again = launch_again(daemon)
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE
        while not answers(daemon.socket):
            assert again.poll() is None, daemon.log_text()
            assert time.monotonic() < deadline, daemon.log_text()
            time.sleep(0.02)  # polling another process: no event to wait on
        with Client(daemon.socket) as client:
            new = [r["pid"] for r in wait_states(client, "rec", ["RUNNING"] * 2)]
            assert not set(new) & set(pids)
            assert (
                client.call("publish", channel="main", message=1, wait=True)["acked"]
                == 1
            )
        os.kill(again.pid, signal.SIGTERM)
        assert again.wait(15) == 0
        assert all(gone(pid) for pid in new)
    finally:
        if again.poll() is None:
            os.kill(again.pid, signal.SIGKILL)
            again.wait(10)


# -- 10. orphans of an earlier busd ----------------------------------------------------


def test_start_ends_workers_left_by_an_earlier_busd(start_busd, tmp_path):
    socket_path = str(tmp_path / "busd0" / "busd.sock")  # start_busd's first
    orphan = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        env={**os.environ, "BUSD_DAEMON": socket_path, "BUSD_BROKER": "ghost"},
    )
    # Reap it as soon as it dies, as init would reap a real orphan: busd
    # waits for the processes it ends, and a zombie looks alive.
    reaper = threading.Thread(target=orphan.wait, daemon=True)
    reaper.start()
    try:
        wait_for(
            lambda: psutil.Process(orphan.pid).environ().get("BUSD_DAEMON"),
            10,
            "the orphan's environment",
        )
        daemon = start_busd(
            config_text=broker("rec", "brokers_for_tests:Recorder", instances=1)
        )
        with daemon.client() as client:
            assert client.state()["socket"] == socket_path
        reaper.join(10)
        assert orphan.returncode == -signal.SIGKILL
        log = daemon.log_text()
        assert (
            f"Ending worker PID {orphan.pid} of broker ghost left by an earlier busd"
            in log
        )
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait(10)


# -- 11. reload under load -------------------------------------------------------------


def test_reload_rolls_brokers_while_messages_stream(start_busd, tmp_path):
    path = tmp_path / "reload.jsonl"

    def config(instances: int, version: str) -> str:
        return broker(
            "rec",
            "brokers_for_tests:Recorder",
            path,
            env={"VERSION": version},
            instances=instances,
        )

    daemon = start_busd(config_text=config(1, "1"))
    done = threading.Event()
    accepted: list[int] = []
    publisher_errors: list[BaseException] = []

    def publisher() -> None:
        number = 0
        try:
            with daemon.client() as client:
                while not done.is_set():
                    # Pipelined like publish_many, but a "busy" refusal (a
                    # full queue) only skips that message.
                    batch = range(number, number + 20)
                    sent = [
                        (n, client.send("publish", channel="main", message=n))
                        for n in batch
                    ]
                    for n, request in sent:
                        try:
                            client.wait(request)
                        except BusError as error:
                            if error.code != "busy":
                                raise
                        else:
                            accepted.append(n)
                    number += 20
        except BaseException as error:
            publisher_errors.append(error)

    thread = threading.Thread(target=publisher, daemon=True)
    thread.start()
    try:
        with daemon.client(timeout=30) as client:
            (first,) = wait_states(client, "rec", ["RUNNING"])
            wait_for(lambda: len(accepted) > 200, 20, "messages flowing")
            daemon.config.write_text(config(3, "1"))
            client.reload()
            scaled = wait_states(client, "rec", ["RUNNING"] * 3)
            assert scaled[0]["pid"] == first["pid"]  # scaling alone restarts none
            old = {r["pid"] for r in scaled}
            mark = len(accepted)
            daemon.config.write_text(config(3, "2"))
            client.reload()

            def rolled() -> bool:
                now = rows(client, "rec")
                return all(r["state"] == "RUNNING" for r in now) and not (
                    {r["pid"] for r in now} & old
                )

            wait_for(rolled, 30, "a rolling restart of all three instances")
            wait_for(lambda: len(accepted) > mark + 200, 20, "messages after it")
    finally:
        done.set()
        thread.join(20)
    assert not publisher_errors, publisher_errors
    expected = set(accepted)
    found = wait_records(
        path,
        lambda r: expected <= set(messages_of(r)),
        timeout=30,
        what=f"all {len(expected)} accepted messages recorded",
    )
    assert {r["instance"] for r in found} == {0, 1, 2}
    log = daemon.log_text()
    assert "Broker rec: config changed; rolling restart" in log


# -- 12. a worker flooding stderr ------------------------------------------------------


def test_worker_flooding_stderr_does_not_block_busd(start_busd, tmp_path):
    path = tmp_path / "flood.jsonl"
    daemon = start_busd(config_text=broker("flood", "brokers_for_tests:Flooder", path))
    megabytes = 16
    with daemon.client() as client, daemon.client() as pinger:
        client.publish("main", {"flood": megabytes, "short": 800})
        slowest = 0.0
        pings = 0
        while not records(path):
            started = time.monotonic()
            assert pinger.ping() == "pong"
            slowest = max(slowest, time.monotonic() - started)
            pings += 1
            assert pings < 100_000, "the flood never ended"
        result = client.call("publish", channel="main", message={"flood": 0}, wait=True)
        assert result["acked"] == 1
        lines = log_lines(client, "flood")
    assert slowest < 1.0, f"a ping took {slowest:.2f} s during the flood"
    assert "flood done" in [e["message"] for e in lines]
    truncated = [
        e["message"] for e in lines if e["message"].endswith("[line truncated]")
    ]
    # One entry per long line: its start, not pieces of its middle.
    assert len(truncated) == megabytes, len(truncated)
    assert all(m.startswith("x" * MAX_LOG_LINE) for m in truncated)
    assert all(len(m) <= MAX_LOG_LINE + 20 for m in truncated)
    assert daemon.log_text().count("[line truncated]") == megabytes
    print(f"\n{pings} pings during a {megabytes} MB flood, slowest {slowest:.3f} s")


# -- 13. restart policies --------------------------------------------------------------


def test_restart_policies(start_busd, tmp_path):
    path = tmp_path / "exits.jsonl"
    daemon = start_busd(
        config_text=broker(
            "never",
            "brokers_for_tests:Exiter",
            path,
            channels=("never",),
            restart="never",
        )
        + broker(
            "onfail",
            "brokers_for_tests:Exiter",
            path,
            channels=("onfail",),
            restart="on-failure",
        )
        + broker(
            "always",
            "brokers_for_tests:Exiter",
            path,
            channels=("always",),
            restart="always",
        )
    )
    events: list[dict[str, Any]] = []
    with daemon.client(timeout=30) as watcher, daemon.client(timeout=30) as client:
        stream = watcher.events()
        pids = {
            name: rows(client, name)[0]["pid"] for name in ("never", "onfail", "always")
        }

        def after(name: str, *states: str):
            return lambda e: broker_events(e, name)[-len(states) :] == list(states)

        client.publish("never", {"exit": 1})
        collect(stream, events, after("never", "STOPPED"))
        (row,) = rows(client, "never")
        assert row["state"] == "STOPPED" and row["last_exit"] == "exit status 1"

        client.publish("onfail", {"exit": 0})
        collect(stream, events, after("onfail", "STOPPED"))
        assert rows(client, "onfail")[0]["last_exit"] == "exit status 0"
        client.call("broker_start", broker="onfail")
        collect(stream, events, after("onfail", "STARTING", "RUNNING"))
        client.publish("onfail", {"exit": 1})
        collect(stream, events, after("onfail", "BACKOFF", "STARTING", "RUNNING"))
        assert broker_events(events, "onfail") == [
            "STOPPED",
            "STARTING",
            "RUNNING",
            "BACKOFF",
            "STARTING",
            "RUNNING",
        ]

        client.publish("always", {"exit": 0})
        collect(stream, events, after("always", "BACKOFF", "STARTING", "RUNNING"))
        assert broker_events(events, "always") == [
            "BACKOFF",
            "STARTING",
            "RUNNING",
        ]
        (row,) = rows(client, "always")
        assert row["pid"] != pids["always"] and row["last_exit"] == "exit status 0"

        # "never" stayed down all along.
        assert broker_events(events, "never") == ["STOPPED"]
        assert rows(client, "never")[0]["state"] == "STOPPED"

    # The messages that ended a worker came again, flagged, to the restarted
    # one (on-failure after `start`, always by itself), which acked them.
    again = [
        (r["channel"], r["message"]["exit"])
        for r in wait_records(
            path, lambda r: sum(x["redelivered"] for x in r) >= 3, what="redeliveries"
        )
        if r["redelivered"]
    ]
    assert sorted(again) == [("always", 0), ("onfail", 0), ("onfail", 1)]


def test_logs_of_long_lines_fit_in_one_answer_and_say_what_was_left_out(
    start_busd, tmp_path
):
    # 200 lines of 8 KiB (each cut to MAX_LOG_LINE) are 1.6 MB: more than a
    # client's largest frame (1 MiB). The newest fit; the rest is counted.
    path = tmp_path / "flood.jsonl"
    daemon = start_busd(config_text=broker("flood", "brokers_for_tests:Flooder", path))
    with daemon.client() as client:
        result = client.call(
            "publish", channel="main", message={"flood": 200}, wait=True
        )
        assert result["acked"] == 1
        wait_for(
            lambda: "flood done" in [e["message"] for e in log_lines(client, "flood")],
            20,
            "the last line in the ring",
        )
        answer = client.logs(lines=1000, source="flood")
    messages = [e["message"] for e in answer["lines"]]
    assert messages[-1] == "flood done"
    assert answer["left_out"] > 0
    assert len(messages) + answer["left_out"] >= 201
    shown = subprocess.run(
        [
            *(sys.executable, "-m", "busctl", "--socket", daemon.socket),
            *("logs", "flood", "-n", "1000"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.rstrip().endswith("flood done")
    assert f"{answer['left_out']} older lines left out" in shown.stderr, shown.stderr
