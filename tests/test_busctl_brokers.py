"""busctl's view of brokers: the state table and ``publish --wait``.

A real busd runs a real broker, examples/stock.py's OrderBroker, two
instances on channel ``main`` (the ``orders`` fixture). Every check goes
through the ``busctl`` command (its output and exit status) and, for the
processes themselves, psutil: a PID busctl shows must be a live child of
busd's fork server. Each daemon is stopped by PID at the end, and its
workers must be gone with it.

Starting, stopping, restarting and scaling brokers with busctl is tested
in test_broker_lifecycle.py.
"""

from __future__ import annotations

import json
import re

from helpers import (
    ROOT,
    assert_one_line_error,
    assert_worker_of,
    broker_state,
    busctl,
    instance_pids,
    run,
    running_rows,
    state_table,
    wait_for,
)

# A handler that cannot be imported: every start fails fast, then FATAL.
BROKEN = f"""
[brokers.broken]
handler = "no_such_module_for_busd_tests:Broker"
cwd = {json.dumps(str(ROOT))}
channels = ["audit"]
"""


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


def test_publish_help_mentions_wait_and_timeout():
    text = busctl("publish", "--help").stdout
    assert "--wait" in text and "--timeout" in text
    assert "busctl --timeout 60 publish --wait main" in text
