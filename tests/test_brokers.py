"""Brokers under a real busd: delivery, failures, supervision, no orphans.

Every test starts a real daemon (``start_busd``) whose brokers are real
worker processes: ``examples.stock:OrderBroker`` or the brokers of
tests/brokers_for_tests.py, which append what they get to a file named by
their ``RECORD`` variable. Tests read those files, ``state``, the logs and
the ``events`` stream back, always with a deadline.
"""

from __future__ import annotations

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
from busd.instance import MAX_LOG_LINE

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
