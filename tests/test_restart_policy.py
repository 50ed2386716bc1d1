"""Restart policies: what busd does when a worker exits or crashes.

``restart = "never"``, ``"on-failure"`` and ``"always"``, the BACKOFF
between a worker's exit and its next start, redelivery of the message that
ended a worker to the restarted one, and FATAL after MAX_FAST_FAILURES fast
failures in a row (which ``broker_start`` clears, to try again).

Every test starts a real daemon (``start_busd``) whose brokers are the
brokers of tests/brokers_for_tests.py, and watches the ``events`` stream
and ``state`` with a deadline.
"""

from __future__ import annotations

from typing import Any

from helpers import (
    broker,
    broker_events,
    collect,
    rows,
    wait_for,
    wait_records,
    wait_states,
)

from busd.supervision.services import RestartTiming

MAX_FAST_FAILURES = RestartTiming().max_fast_failures

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


# -- FATAL after fast crashes ----------------------------------------------------------


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
