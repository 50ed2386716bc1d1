"""Restart policies: what busd does when a worker exits or crashes.

``restart = "never"``, ``"on-failure"`` and ``"always"``, the BACKOFF
between a worker's exit and its next start, redelivery of the message that
ended a worker to the restarted one, retries for ever by default (a worker
that exits before it is ready, even with status 0, included), and FATAL
only after more failed starts in a row than a broker's ``start_retries``
(which ``broker_start`` clears, to try again).

Every test starts a real daemon (``start_busd``) whose brokers are the
brokers of tests/brokers_for_tests.py, and watches the ``events`` stream
and ``state`` with a deadline.
"""

from __future__ import annotations

import re
import time
from typing import Any

from helpers import (
    assert_one_line_error,
    broker,
    broker_events,
    collect,
    rows,
    run,
    wait_for,
    wait_records,
    wait_states,
)

START_RETRIES = 4
#: Failed starts in a row that make an instance FATAL.
FAILED_STARTS = START_RETRIES + 1

# -- restart = never, on-failure, always -----------------------------------------------


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
        # The restarted worker acks the redelivered message first: a worker
        # acks a read's quick messages together, so one that exits on the
        # next message could take that ack with it, and the message would
        # rightly come a third time (at-least-once).
        wait_for(
            lambda: rows(client, "onfail")[0]["acked"] == 1,
            what="the redelivered message acked",
        )
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


# -- FATAL after start_retries ---------------------------------------------------------


def test_crash_at_start_becomes_fatal_past_start_retries_and_start_tries_again(
    start_busd,
):
    daemon = start_busd(
        config_text=broker(
            "crashy", "brokers_for_tests:CrashAtStart", start_retries=START_RETRIES
        )
    )
    with daemon.client() as client:
        (row,) = wait_states(client, "crashy", ["FATAL"])
        assert row["last_exit"] == "exit status 3"
        assert row["exit_cause"] == "exit status 3 before it was ready"
        assert (row["failures"], row["next_try"]) == (FAILED_STARTS, None)
        assert row["pid"] is None
        assert row["restarts"] == FAILED_STARTS - 1
    assert (
        "crashy:0: FATAL after 5 failed starts in a row (start_retries = 4); "
        "`busctl start crashy:0` tries again"
    ) in daemon.log_text()

    with daemon.client(timeout=30) as watcher, daemon.client(timeout=30) as client:
        stream = watcher.events()
        client.call("broker_start", broker="crashy")
        events: list[dict[str, Any]] = []
        collect(stream, events, lambda e: "FATAL" in broker_events(e, "crashy"))
        states = broker_events(events, "crashy")
        assert states == ["STARTING", "BACKOFF"] * (FAILED_STARTS - 1) + [
            "STARTING",
            "FATAL",
        ]
        assert all(e["instance"] == 0 for e in events if e.get("broker"))
        (row,) = wait_states(client, "crashy", ["FATAL"])
        assert row["restarts"] == 2 * (FAILED_STARTS - 1)


# -- for ever by default ---------------------------------------------------------------


def test_without_start_retries_a_crashing_broker_is_retried_for_ever(start_busd):
    """Was failing (issue 15): FATAL after 5 fast failures, whatever the broker
    said; its queue then waited for an operator."""
    daemon = start_busd(
        config_text=broker("crashy", "brokers_for_tests:CrashAtStart", backoff_max=0.2)
    )
    with daemon.client(timeout=30) as watcher, daemon.client() as client:
        stream = watcher.events()
        events: list[dict[str, Any]] = []
        # Twice as many failed starts as the old limit, and more to come.
        collect(
            stream,
            events,
            lambda e: broker_events(e, "crashy").count("BACKOFF") >= 10,
        )
        assert "FATAL" not in broker_events(events, "crashy")
        (row,) = rows(client, "crashy")
        assert row["state"] in ("BACKOFF", "STARTING")
        assert row["failures"] >= 10
        assert row["exit_cause"] == "exit status 3 before it was ready"
    log = daemon.log_text()
    assert "FATAL" not in log
    # The wait doubles (0.1, then 0.2 s) and stays at backoff_max.
    assert (
        "crashy:0: STARTING -> BACKOFF (failed start 1 in a row, next try in 0.1 s)"
        in log
    )
    assert (
        "crashy:0: STARTING -> BACKOFF (failed start 9 in a row, next try in 0.2 s)"
        in log
    )
    assert daemon.stop() == 0


def test_a_command_that_exits_0_before_it_is_ready_is_restarted_not_stopped(
    start_busd,
):
    """Was failing (issue 15): ``command = ["/bin/true"]`` with restart =
    on-failure ended STOPPED, its queue growing with no warning."""
    daemon = start_busd(
        config_text='[brokers.truth]\ncommand = ["/bin/true"]\nchannels = ["t"]\n'
    )
    with daemon.client() as client:
        wait_for(
            lambda: rows(client, "truth")[0]["failures"] >= 2,
            what="two failed starts",
        )
        (row,) = rows(client, "truth")
        assert row["state"] in ("BACKOFF", "STARTING"), row
        assert row["exit_cause"] == "exit status 0 before it was ready"
        assert row["should_run"] is True
    log = daemon.log_text()
    assert re.search(
        r"truth:0 \(PID \d+\): exited unexpectedly \(exit status 0\) before it "
        r"was ready",
        log,
    ), log
    assert (
        "truth:0: STARTING -> BACKOFF (failed start 1 in a row, next try in 0.1 s)"
        in log
    )
    assert "truth:0: STARTING -> STOPPED" not in log

    # busctl state: degraded, exit 3, the row says why.
    result = run(daemon, "state")
    assert result.returncode == 3, result.stderr
    assert re.search(
        r"^    Health: degraded - truth:0 (BACKOFF \(\d+ failed starts\)|STARTING)$",
        result.stdout,
        re.MULTILINE,
    ), result.stdout
    # A publish --wait is accepted: the broker will run, as far as busd
    # knows, so the wait ends only with the timeout.
    began = time.monotonic()
    waited = run(daemon, "--timeout", "1", "publish", "--wait", "t", "x")
    assert waited.returncode == 75, waited.stderr
    assert time.monotonic() - began >= 1
    assert "not every broker has settled" in assert_one_line_error(waited)
    assert daemon.stop() == 0
