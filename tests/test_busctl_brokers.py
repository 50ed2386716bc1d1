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
import time

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

# A handler that cannot be imported: every start fails, then FATAL (on the
# second failed start: start_retries 1).
BROKEN = f"""
[brokers.broken]
handler = "no_such_module_for_busd_tests:Broker"
cwd = {json.dumps(str(ROOT))}
channels = ["audit"]
start_retries = 1
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


def test_state_says_healthy_and_exits_0_while_every_wanted_instance_runs(orders):
    table = state_table(orders)  # exit status 0
    assert "\n    Health: healthy\n" in table
    as_json = run(orders, "--json", "state")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["health"] == {"status": "healthy", "reasons": []}
    # An instance stopped on purpose is not missed.
    assert run(orders, "stop", "orders:1").returncode == 0
    table = state_table(orders)
    assert "\n    Health: healthy\n" in table
    assert re.search(r"^  orders:1  STOPPED   last exit: exit status 0  ", table, re.M)


def test_a_fatal_instance_says_why_and_state_exits_3(start_busd):
    """Was failing (issue 15): `busctl state` exited 0 with a FATAL broker, the
    header looked the same whatever the health, the FATAL row did not say why."""
    daemon = start_busd(config_text=BROKEN)
    wait_for(
        lambda: broker_state(daemon, "broken")["instances"][0]["state"] == "FATAL",
        what="broken:0 FATAL",
    )
    result = run(daemon, "state")
    assert (result.returncode, result.stderr) == (3, "")
    assert (
        "\n    Health: degraded - broken:0 FATAL (2 failed starts)\n" in result.stdout
    )
    row = re.search(r"^  broken:0  FATAL     (.*)$", result.stdout, re.MULTILINE)
    assert row, result.stdout
    assert re.match(
        r"2 failed starts \(start_retries 1\), last exit: exit status [1-9]\d* "
        r"before it was ready  restarts 1  ",
        row[1],
    ), row[1]
    as_json = run(daemon, "--json", "state")
    assert as_json.returncode == 3, as_json.stderr
    state = json.loads(as_json.stdout)
    assert state["health"] == {
        "status": "degraded",
        "reasons": ["broken:0 FATAL (2 failed starts)"],
    }
    (described,) = state["brokers"]["broken"]["instances"]
    assert (described["failures"], described["next_try"]) == (2, None)
    assert described["exit_cause"].endswith(" before it was ready")

    # Nothing will take a message on its channel without an operator.
    began = time.monotonic()
    refused = run(daemon, "--timeout", "30", "publish", "--wait", "audit", "x")
    assert time.monotonic() - began < 10
    assert refused.returncode == 69
    assert assert_one_line_error(refused).startswith(
        "busctl: no instance of broker 'broken' can run: broken:0 FATAL "
        "(2 failed starts) (`busctl start broken` starts them;"
    )
    assert broker_state(daemon, "broken")["accepted"] == 0

    # busctl start answers at the first failed start (BACKOFF: a retry is
    # due), not only once the retries are spent.
    result = run(daemon, "start", "broken:0")
    assert result.returncode == 1
    assert re.fullmatch(
        r"started broken:0: (BACKOFF|FATAL) \(exit status \d+\)\n", result.stdout
    ), result.stdout
    assert re.fullmatch(
        r"busctl: not running after start: broken:0 (BACKOFF|FATAL) "
        r"\(exit status \d+\); `busctl logs` says why",
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


def test_publish_wait_is_refused_at_once_while_no_instance_can_run(orders):
    """Was failing (issue 15): it waited the whole --timeout, then advised to
    raise --timeout, and did not name the broker."""
    stopped = run(orders, "stop", "orders")
    assert (stopped.returncode, stopped.stdout) == (
        0,
        "stopped orders: 0 of 2 instances running\n",
    )
    began = time.monotonic()
    result = run(orders, "--timeout", "30", "publish", "--wait", "main", "BUY A 1")
    assert time.monotonic() - began < 10  # at once, not after 30 s
    assert (result.returncode, result.stdout) == (69, "")
    assert assert_one_line_error(result) == (
        "busctl: no instance of broker 'orders' can run: orders:0 STOPPED, "
        "orders:1 STOPPED (`busctl start orders` starts them; `busctl logs "
        "orders` says why they stopped); the message was not accepted"
    )
    many = run(orders, "publish", "--wait", "main", "-", input="BUY B 1\n")
    assert many.returncode == 69
    assert "no instance of broker 'orders' can run" in assert_one_line_error(many)
    assert broker_state(orders)["accepted"] == 0  # refused, not queued

    # A plain publish asks for no outcome: it is queued, and delivered once
    # an instance runs.
    assert run(orders, "publish", "main", "BUY C 1").returncode == 0
    started = run(orders, "start", "orders")
    assert (started.returncode, started.stdout) == (
        0,
        "started orders: 2 of 2 instances running\n",
    )
    wait_for(lambda: broker_state(orders)["acked"] == 1, what="the queued order")
    waited = run(orders, "publish", "--wait", "main", "BUY D 1")
    assert waited.returncode == 0, waited.stderr


# -- help ------------------------------------------------------------------------------


def test_publish_help_mentions_wait_and_timeout():
    text = busctl("publish", "--help").stdout
    assert "--wait" in text and "--timeout" in text
    assert "busctl --timeout 60 publish --wait main" in text
