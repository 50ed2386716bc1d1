"""Broker lifecycle: start, stop, restart, scale, reload, and no orphans.

Starting, stopping, restarting and scaling a broker or one instance of it,
over the control socket and with ``busctl`` (its output, exit status and
usage errors); a worker that ignores the stop request and SIGTERM; a
reload that scales and rolls a broker while messages stream, and one that
removes a broker holding messages; and workers
that end with a killed busd, or are ended by the next one.

Every test starts a real daemon whose brokers are real worker processes:
``examples.stock:OrderBroker`` (the ``orders`` fixture, two instances) or
the brokers of tests/brokers_for_tests.py. For the processes themselves
the tests ask psutil: a PID busd shows must be a live child of its fork
server, and an instance busd stopped must be gone.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import psutil
import pytest
from helpers import (
    STARTUP_DEADLINE,
    answers,
    assert_one_line_error,
    assert_worker_of,
    broker,
    busctl,
    gone,
    instance_pids,
    messages_of,
    records,
    rows,
    run,
    running_rows,
    state_table,
    wait_for,
    wait_records,
    wait_states,
)

from busctl.client import BusError, Client
from busd.spool import Spool

# -- start, stop, restart and scale over the control socket ----------------------------


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


# -- start, stop, restart and scale with busctl ----------------------------------------


def test_stop_and_start_one_instance(orders):
    before = instance_pids(orders)
    stopped = run(orders, "stop", "orders:1")
    assert stopped.returncode == 0, stopped.stderr
    assert re.fullmatch(r"stopped orders:1: STOPPED \(.+\)\n", stopped.stdout)
    assert not psutil.pid_exists(before[1])  # busd reaped it before answering

    table = state_table(orders)
    assert running_rows(table) == {0: before[0]}
    assert re.search(r"^  orders:1  STOPPED   last exit: ", table, re.MULTILINE)
    assert "2 of 2" not in table and "1 of 2 instances running" in table

    started = run(orders, "start", "orders:1")
    assert started.returncode == 0, started.stderr
    match = re.fullmatch(r"started orders:1: RUNNING, PID (\d+)\n", started.stdout)
    assert match, started.stdout
    new_pid = int(match[1])
    assert new_pid != before[1]
    assert_worker_of(orders, new_pid)
    assert running_rows(state_table(orders)) == {0: before[0], 1: new_pid}


def test_json_prints_the_broker_description(orders):
    result = run(orders, "--json", "stop", "orders")
    assert result.returncode == 0, result.stderr
    broker = json.loads(result.stdout)
    assert broker["channels"] == ["main"]
    assert [row["state"] for row in broker["instances"]] == ["STOPPED", "STOPPED"]

    result = run(orders, "--json", "start", "orders")
    assert result.returncode == 0, result.stderr
    broker = json.loads(result.stdout)
    assert [row["state"] for row in broker["instances"]] == ["RUNNING", "RUNNING"]
    for row in broker["instances"]:
        assert_worker_of(orders, row["pid"])


def test_restart_changes_the_pid(orders):
    before = instance_pids(orders)
    one = run(orders, "restart", "orders:0")
    assert one.returncode == 0, one.stderr
    match = re.fullmatch(r"restarted orders:0: RUNNING, PID (\d+)\n", one.stdout)
    assert match and int(match[1]) != before[0]
    assert not psutil.pid_exists(before[0])
    assert instance_pids(orders) == {0: int(match[1]), 1: before[1]}

    middle = instance_pids(orders)
    every = run(orders, "restart", "orders")
    assert (every.returncode, every.stdout) == (
        0,
        "restarted orders: 2 of 2 instances running\n",
    )
    after = running_rows(state_table(orders))
    assert sorted(after) == [0, 1]
    assert not set(after.values()) & set(middle.values())
    for pid in after.values():
        assert_worker_of(orders, pid)


def test_scale_up_then_down(orders):
    up = run(orders, "scale", "orders", "3")
    assert (up.returncode, up.stdout) == (
        0,
        "scaled orders: 3 of 3 instances running\n",
    )
    three = running_rows(state_table(orders))
    assert sorted(three) == [0, 1, 2]
    for pid in three.values():
        assert_worker_of(orders, pid)

    down = run(orders, "scale", "orders", "1")
    assert (down.returncode, down.stdout) == (
        0,
        "scaled orders: 1 of 1 instances running\n",
    )
    table = state_table(orders)
    assert running_rows(table) == {0: three[0]}
    assert "orders:1" not in table and "orders:2" not in table
    assert not psutil.pid_exists(three[1]) and not psutil.pid_exists(three[2])


# -- wrong targets ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["start", "orders:"],
        ["stop", ":1"],
        ["restart", "orders:x"],
        ["start", "orders:-1"],
        ["stop", "orders:1:2"],
        ["restart", "orders:\N{ARABIC-INDIC DIGIT ONE}"],
        ["start"],
        ["scale", "orders"],
        ["scale", "orders", "many"],
        ["scale", "orders", "-1"],
    ],
    ids=" ".join,
)
def test_malformed_targets_are_usage_errors(tmp_path, args):
    # No busd at this socket: the usage error is found before connecting.
    result = busctl("--socket", str(tmp_path / "absent.sock"), *args)
    assert result.returncode == 64
    assert "--help" in assert_one_line_error(result)
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["start", "nosuch"], "busctl: no broker 'nosuch' (configured: orders)"),
        (["scale", "nosuch", "2"], "busctl: no broker 'nosuch' (configured: orders)"),
        (["stop", "orders:2"], "busctl: broker 'orders' has no instance 2 (it has 2)"),
    ],
)
def test_unknown_broker_or_instance(orders, args, message):
    result = run(orders, *args)
    assert (result.returncode, result.stdout) == (1, "")
    assert assert_one_line_error(result) == message


# -- help ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["start", "stop", "restart", "scale"])
def test_each_broker_command_has_help_with_examples(command):
    result = busctl(command, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: busctl {command}")
    assert f"examples:\n  busctl {command} orders" in result.stdout
    assert "exit status:" in result.stdout
    assert command in busctl("--help").stdout


# -- stop escalation -------------------------------------------------------------------


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
    # Not before stop_timeout (SIGKILL comes at its end), and a sanity bound
    # above (about 1.1 s normally): 10 s only fails if the escalation stalls.
    assert 0.9 <= took < 10, took
    assert not [
        p
        for p in psutil.process_iter(["environ"])
        if (p.info["environ"] or {}).get("BUSD_DAEMON") == daemon.socket
    ]


# -- reload under load -----------------------------------------------------------------


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


def test_a_broker_removed_by_reload_settles_its_messages_dead(start_busd, tmp_path):
    """A reload that removes a broker still holding messages (one in a
    worker's hands, the others queued) settles each of them ``dead``: a
    ``publish --wait`` on one of them answers, a letter saying why goes to
    ``dead``, the spool records the settlement, one warning counts them.

    Before, they stayed in the removed broker's queue for good, and the
    --wait never answered.
    """
    spool = tmp_path / "spool"
    kept, hung = tmp_path / "kept.jsonl", tmp_path / "hung.jsonl"
    stays = broker("stays", "brokers_for_tests:Recorder", kept)
    leaving = broker(
        "leaving",
        "brokers_for_tests:HangOn",
        hung,
        env={"HANG_ON": "hang"},
        max_inflight=1,
        stop_timeout=1.0,  # its hung worker is SIGKILLed 1 s into the stop
    )
    busd_table = f'[busd]\nspool = "{spool}"\n\n'
    daemon = start_busd(busd_table + stays + leaving)
    sent = ["hang", "q1", "q2", "waited"]
    with (
        daemon.client(timeout=30) as listener,
        daemon.client(timeout=30) as client,
        daemon.client(timeout=30) as waiter,
    ):
        dead = listener.subscribe("dead")
        client.publish("main", "hang")
        wait_records(hung, lambda r: messages_of(r) == ["hang"], what="the hang")
        client.publish_many("main", ["q1", "q2"])
        request = waiter.send("publish", channel="main", message="waited", wait=True)
        wait_records(kept, lambda r: messages_of(r) == sent, what="stays' records")
        state = client.state()["brokers"]["leaving"]
        assert (state["queued"], state["instances"][0]["inflight"]) == (3, 1)

        daemon.config.write_text(busd_table + stays)
        client.reload()
        answer = waiter.wait(request)  # acked by stays, dead in leaving
        assert (answer["brokers"], answer["acked"], answer["dead"]) == (2, 1, 1)
        letters = [dead.next_event(20)["message"] for _ in sent]
        assert sorted(letter["message"] for letter in letters) == sorted(sent)
        for letter in letters:
            assert (letter["broker"], letter["channel"]) == ("leaving", "main")
            assert letter["errors"][-1] == "broker leaving was removed from the config"
        assert "leaving" not in client.state()["brokers"]
        after = client.call("publish", channel="main", message="after", wait=True)
        assert (after["brokers"], after["acked"]) == (1, 1)  # stays only
    assert daemon.stop() == 0
    log = daemon.log_text()
    assert log.count("removed from the config with") == 1
    assert (
        "Broker leaving: removed from the config with 4 messages not acknowledged; "
        "they are dead (sent to the 'dead' channel)"
    ) in log
    reopened = Spool(str(spool))  # busd is gone: nothing left unsettled
    assert reopened.pending == {}
    reopened.close()


# -- no orphans after busd is killed ---------------------------------------------------


BUSD_RUN = [sys.executable, "-m", "busd", "run"]


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
    # Tens of ms normally; 10 s (a sanity bound) only fails if they outlive busd.
    wait_for(lambda: all(gone(pid) for pid in pids), 10.0, f"{pids} to die")

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


# -- orphans of an earlier busd --------------------------------------------------------


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
