"""busctl and the brokers: start, stop, restart, scale, publish --wait, state.

A real busd runs a real broker, examples/stock.py's OrderBroker, two
instances on channel ``main``. Every check goes through the ``busctl``
command (its output and exit status) and, for the processes themselves,
psutil: a PID busctl shows must be a live child of busd, and an instance
busd stopped must be gone. Each daemon is stopped by PID at the end, and
its workers must be gone with it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import RunningDaemon, assert_one_line_error, busctl, wait_for

ROOT = Path(__file__).resolve().parent.parent

ORDERS = f"""
[brokers.orders]
handler = "examples.stock:OrderBroker"
cwd = {json.dumps(str(ROOT))}
channels = ["main"]
instances = 2
max_retries = 0
"""

# A handler that cannot be imported: every start fails fast, then FATAL.
BROKEN = f"""
[brokers.broken]
handler = "no_such_module_for_busd_tests:Broker"
cwd = {json.dumps(str(ROOT))}
channels = ["audit"]
"""

RUNNING_ROW = re.compile(
    r"^  orders:(?P<index>\d+)  RUNNING   pid (?P<pid>\d+)  up \d+\w+(?: \d+\w+)?  "
    r"restarts \d+  cpu \d+\.\d%  rss [\d.]+[KMG]?i?B  fds \d+  "
    r"inflight \d+  acked \d+(?:  nacked \d+)?$",
    re.MULTILINE,
)


@pytest.fixture
def orders(start_busd) -> Iterator[RunningDaemon]:
    """busd with the ``orders`` broker; at the end, busd and its workers gone."""
    daemon = start_busd(config_text=ORDERS)
    yield daemon
    workers = [psutil.Process(pid) for pid in instance_pids(daemon).values()]
    assert daemon.stop() == 0, daemon.log_text()
    _, alive = psutil.wait_procs(workers, timeout=10)
    for process in alive:
        process.kill()
    assert not alive, f"workers outlived busd: {alive}"


def run(daemon: RunningDaemon, *args: str, **kwargs: Any):
    return busctl("--socket", daemon.socket, *args, **kwargs)


def broker_state(daemon: RunningDaemon, name: str = "orders") -> dict[str, Any]:
    with daemon.client() as client:
        return client.state()["brokers"][name]


def instance_pids(daemon: RunningDaemon) -> dict[int, int]:
    """index -> PID of each orders instance that has a process."""
    return {
        row["index"]: row["pid"]
        for row in broker_state(daemon)["instances"]
        if row["pid"]
    }


def assert_worker_of(daemon: RunningDaemon, pid: int) -> None:
    process = psutil.Process(pid)
    assert process.is_running() and process.ppid() == daemon.fork_server_pid()


def running_rows(table: str) -> dict[int, int]:
    """index -> PID of each RUNNING orders row of ``busctl state``."""
    return {int(m["index"]): int(m["pid"]) for m in RUNNING_ROW.finditer(table)}


def state_table(daemon: RunningDaemon) -> str:
    result = run(daemon, "state")
    assert (result.returncode, result.stderr) == (0, "")
    return result.stdout


# -- state -----------------------------------------------------------------------


def test_state_shows_a_row_per_instance(orders):
    table = state_table(orders)
    assert "   Brokers: 1 configured, 2 of 2 instances running\n" in table
    assert re.search(
        r"^orders  channels main  queued 0/10000  accepted 0  acked 0  retried 0  "
        r"dead 0  redelivered 0$",
        table,
        re.MULTILINE,
    ), table
    rows = running_rows(table)
    assert sorted(rows) == [0, 1], table
    assert rows == instance_pids(orders)
    for pid in rows.values():
        assert_worker_of(orders, pid)


def test_state_without_brokers_says_so(busd_daemon):
    assert state_table(busd_daemon).endswith("\n   Brokers: none configured\n")


def test_a_fatal_instance_shows_its_last_exit(start_busd):
    daemon = start_busd(config_text=BROKEN)
    row = re.search(r"^  broken:0  FATAL     (.*)$", state_table(daemon), re.MULTILINE)
    assert row, state_table(daemon)
    exit_status = re.match(r"last exit: (exit status [1-9]\d*)  restarts \d+", row[1])
    assert exit_status, row[1]

    result = run(daemon, "start", "broken:0")
    assert result.returncode == 1
    assert re.fullmatch(r"started broken:0: FATAL \(exit status \d+\)\n", result.stdout)
    assert re.fullmatch(
        r"busctl: not running after start: broken:0 FATAL \(exit status \d+\); "
        r"`busctl logs` says why",
        assert_one_line_error(result),
    )
    assert daemon.stop() == 0


# -- start, stop, restart, scale ----------------------------------------------------


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


# -- wrong targets -------------------------------------------------------------------


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


# -- publish --wait ------------------------------------------------------------------


def test_publish_wait_counts_the_acks(orders):
    one = run(orders, "publish", "--wait", "main", "BUY ABCD 10")
    assert one.returncode == 0, one.stderr
    assert re.fullmatch(
        r"published message \d+ on main \(1 brokers, 0 subscribers\): "
        r"1 acked, 0 dead\n",
        one.stdout,
    )
    as_json = json.loads(
        run(orders, "--json", "publish", "--wait", "main", "SELL A 1").stdout
    )
    assert (as_json["acked"], as_json["dead"]) == (1, 0)

    many = run(orders, "publish", "--wait", "main", "-", input="BUY B 1\nSELL C 2\n")
    assert (many.returncode, many.stdout) == (
        0,
        "published 2 messages on main: 2 acked, 0 dead\n",
    )
    assert broker_state(orders)["acked"] == 4


def test_publish_wait_on_a_channel_without_brokers(busd_daemon):
    result = busctl("--socket", busd_daemon.socket, "publish", "--wait", "x", "hi")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("(0 brokers, 0 subscribers): 0 acked, 0 dead\n")


def test_publish_wait_says_when_a_message_went_dead(orders):
    result = run(orders, "publish", "--wait", "main", "garbage")
    assert result.returncode == 1
    match = re.fullmatch(
        r"published message (\d+) on main \(1 brokers, 0 subscribers\): "
        r"0 acked, 1 dead\n",
        result.stdout,
    )
    assert match, result.stdout
    assert assert_one_line_error(result) == (
        f"busctl: message {match[1]} on main went to the dead channel at 1 of 1 "
        "brokers; `busctl logs` says why"
    )

    many = run(orders, "publish", "--wait", "main", "-", input="BUY B 1\ngarbage\n")
    assert (many.returncode, many.stdout) == (
        1,
        "published 2 messages on main: 1 acked, 1 dead\n",
    )
    assert "1 of 2 messages on main went to the dead channel" in many.stderr
    assert re.search(
        r"^orders  .*  acked 1  retried 0  dead 2  ", state_table(orders), re.M
    )


def test_publish_wait_times_out_while_no_instance_runs(orders):
    stopped = run(orders, "stop", "orders")
    assert (stopped.returncode, stopped.stdout) == (
        0,
        "stopped orders: 0 of 2 instances running\n",
    )
    result = run(orders, "--timeout", "0.5", "publish", "--wait", "main", "BUY A 1")
    assert result.returncode == 75
    assert "raise --timeout rather than publish again" in assert_one_line_error(result)

    # The message was accepted: once an instance runs, it is delivered.
    started = run(orders, "start", "orders")
    assert (started.returncode, started.stdout) == (
        0,
        "started orders: 2 of 2 instances running\n",
    )
    wait_for(lambda: broker_state(orders)["acked"] == 1, what="the queued order")


# -- help ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["start", "stop", "restart", "scale"])
def test_each_broker_command_has_help_with_examples(command):
    result = busctl(command, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: busctl {command}")
    assert f"examples:\n  busctl {command} orders" in result.stdout
    assert "exit status:" in result.stdout
    assert command in busctl("--help").stdout


def test_publish_help_mentions_wait_and_timeout():
    text = busctl("publish", "--help").stdout
    assert "--wait" in text and "--timeout" in text
    assert "busctl --timeout 60 publish --wait main" in text
