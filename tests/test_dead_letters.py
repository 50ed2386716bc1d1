"""The dead-letter store end to end: a real busd, real workers, busctl.

A handler that always raises (tests/brokers_for_tests.py:FailUnlessFixed)
sends every message to the store after ``max_retries``; ``busctl dead``
lists and shows them; once the handler is fixed (its ``env`` changed and
``busctl reload``), ``busctl dead replay`` delivers them. With the spool
on, the letters outlive a busd kill -9. The in-process tests of the store
are tests/test_core_deadletters.py.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from helpers import (
    assert_one_line_error,
    broker,
    busctl,
    messages_of,
    records,
    rows,
    run,
    wait_for,
    wait_states,
)

MESSAGES = ["BUY ABCD 10", {"order": 2}, "SELL EFGH 5"]


def jobs(record: Path, fixed: bool, **settings: object) -> str:
    env = {"FIXED": "1"} if fixed else {}
    return broker(
        "jobs",
        "brokers_for_tests:FailUnlessFixed",
        record,
        env=env,
        instances=2,
        max_retries=2,
        **settings,
    )


def dead_count(client) -> int:
    return client.state()["dead_letters"]


def test_a_handler_that_always_raises_fills_the_store_and_replay_delivers_after_the_fix(
    start_busd, tmp_path
):
    record = tmp_path / "jobs.jsonl"
    daemon = start_busd(config_text=jobs(record, fixed=False))
    with daemon.client() as client:
        published = [client.publish("main", m)["id"] for m in MESSAGES]
        wait_for(lambda: client.state()["brokers"]["jobs"]["dead"] == 3, 20, "3 dead")
        state = client.state()
    # Each was tried max_retries + 1 times, then kept: not unrouted, not gone
    # (before the store: counted unrouted, its content only in the log).
    tries = [r["message"] for r in records(record)]
    assert sorted(map(json.dumps, tries)) == sorted(map(json.dumps, MESSAGES * 3))
    assert state["unrouted"] == 0
    assert (state["dead_letters"], state["dead_letters_overflowed"]) == (3, 0)

    listed = run(daemon, "dead")
    assert (listed.returncode, listed.stderr) == (0, "")
    lines = listed.stdout.splitlines()
    assert lines[0].split() == [
        "ID",
        "WHEN",
        "BROKER",
        "CHANNEL",
        "ATTEMPTS",
        "MESSAGE",
        "LAST",
        "ERROR",
    ]
    assert len(lines) == 5 and lines[4].startswith("3 dead letters; ")
    for line in lines[1:4]:
        assert " jobs    main            3  " in line
        assert "RuntimeError: cannot handle" in line
    letters = json.loads(run(daemon, "--json", "dead", "list").stdout)
    assert sorted(letter["message_id"] for letter in letters) == published
    by_message = {letter["message_id"]: letter for letter in letters}
    first = by_message[published[1]]
    assert (first["channel"], first["broker"], first["attempts"]) == ("main", "jobs", 3)
    assert first["preview"] == '{"order": 2}'

    shown = run(daemon, "dead", "show", str(first["id"]))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0] == (
        f"Dead letter {first['id']}: message {published[1]} on main, given up by "
        "broker jobs after 3 attempts"
    )
    assert '  Message: {"order": 2}' in shown.stdout
    assert shown.stdout.count("RuntimeError: cannot handle {'order': 2} yet") == 3
    whole = json.loads(run(daemon, "--json", "dead", "show", str(first["id"])).stdout)
    assert whole["message"] == {"order": 2}
    assert len(whole["errors"]) == 3

    table = run(daemon, "state").stdout
    assert "      Dead: 3 letters (`busctl dead list`)" in table.splitlines()

    # The fix: a reload restarts the instances with FIXED=1.
    with daemon.client() as client:
        old = {row["pid"] for row in rows(client, "jobs")}
        daemon.config.write_text(jobs(record, fixed=True))
        assert run(daemon, "reload").returncode == 0

        def restarted() -> bool:
            now = rows(client, "jobs")
            return all(r["state"] == "RUNNING" for r in now) and not (
                {r["pid"] for r in now} & old
            )

        wait_for(restarted, 30, "the rolling restart after the reload")
        before = len(records(record))
        replayed = run(daemon, "dead", "replay", "--all")
        assert (replayed.returncode, replayed.stderr) == (0, "")
        assert replayed.stdout.startswith("replayed 3 dead letters: ")
        wait_for(lambda: client.state()["brokers"]["jobs"]["acked"] == 3, 20, "3 acks")
        assert dead_count(client) == 0
    # Delivered once each, as new messages, on their channel.
    after = records(record)[before:]
    assert sorted(map(json.dumps, messages_of(after))) == sorted(
        map(json.dumps, MESSAGES)
    )
    assert all(r["attempt"] == 1 and not r["redelivered"] for r in after)
    assert run(daemon, "dead").stdout == "no dead letters\n"


def test_a_replay_refused_keeps_the_letter_and_says_why(start_busd, tmp_path):
    """Two brokers on main: jobs kills every message, stuck (queue_size 1)
    never starts. A replay while stuck's queue is full is ``busy``: the
    letter stays, exit 75. Once no broker listens on the channel: exit 1."""
    record = tmp_path / "jobs.jsonl"
    stuck = broker("stuck", "spool_brokers:Broken", None, queue_size=1, restart="never")
    daemon = start_busd(config_text=jobs(record, fixed=False) + stuck)
    with daemon.client() as client:
        assert client.publish("main", "one")["brokers"] == 2
        wait_for(lambda: dead_count(client) == 1, 20, "the dead letter")
        [letter] = client.dead_letters()
    busy = run(daemon, "dead", "replay", str(letter["id"]))
    assert busy.returncode == 75
    assert assert_one_line_error(busy) == (
        f"busctl: dead letter {letter['id']} stays in the store: broker 'stuck' "
        "has 1 messages queued (queue_size 1); try again later"
    )
    assert busy.stdout == "replayed 0 dead letters\n"
    with daemon.client() as client:
        assert [d["id"] for d in client.dead_letters()] == [letter["id"]]

        # No broker on main any more (a reload removed both): exit 1, kept.
        daemon.config.write_text(
            broker("other", "brokers_for_tests:Recorder", None, channels=("other",))
        )
        client.reload()
        wait_for(lambda: list(client.state()["brokers"]) == ["other"], 20, "reload")
        wait_states(client, "other", ["RUNNING"])
        # stuck's queued message is dead too, settled by the removal.
        wait_for(lambda: dead_count(client) == 2, 20, "stuck's message dead")
        letters = client.dead_letters()
    removed = letters[1]
    assert (removed["broker"], removed["error"]) == (
        "stuck",
        "broker stuck was removed from the config",
    )
    ids = [str(d["id"]) for d in letters]
    nowhere = run(daemon, "dead", "replay", *ids)
    assert nowhere.returncode == 1
    assert assert_one_line_error(nowhere) == (
        f"busctl: dead letters {', '.join(ids)} stay in the store: no broker "
        "listens on channel 'main'"
    )

    unknown = run(daemon, "dead", "drop", ids[0], "999")
    assert unknown.returncode == 1
    assert assert_one_line_error(unknown) == (
        "busctl: no dead letter 999 (the store holds 2 letters; `busctl dead "
        "list` shows them)"
    )
    dropped = run(daemon, "dead", "drop", "--all")
    assert dropped.stdout == f"dropped 2 dead letters ({', '.join(ids)}); 0 left\n"
    with daemon.client() as client:
        assert dead_count(client) == 0
        assert client.state()["unrouted"] == 0
    log = daemon.log_text()
    assert "Dead letters: 0 of 1 replayed, requested by pid " in log
    assert "; 1 kept: broker 'stuck' has 1 messages queued" in log
    assert "Dead letters: 2 dropped, requested by pid " in log


def test_busctl_dead_refuses_bad_command_lines(busd_daemon):
    for argv, says in [
        (["dead", "replay"], "name the letters (IDs from `busctl dead list`) or --all"),
        (["dead", "drop", "1", "--all"], "or --all, not both"),
        (["dead", "show", "x"], "expected a dead letter's ID"),
        (["dead", "show", "0"], "expected a dead letter's ID"),
        (["dead", "burn"], "invalid choice: 'burn'"),
    ]:
        result = run(busd_daemon, *argv)
        assert result.returncode == 64, (argv, result)
        assert says in assert_one_line_error(result), argv
        # A usage error whether busd runs or not: found before connecting.
        nowhere = busctl("--socket", str(busd_daemon.directory / "none"), *argv)
        assert (nowhere.returncode, nowhere.stderr) == (64, result.stderr)
    with busd_daemon.client() as client:
        for op, arguments, says in [
            ("dead_replay", {}, "'dead_replay' needs 'ids' as a non-empty list"),
            ("dead_drop", {"ids": [1], "all": True}, "takes 'ids' or 'all', not both"),
            ("dead_list", {"limit": 0}, "'limit' as a whole number from 1 to 1000"),
            ("dead_show", {"letter": "1"}, "'letter' as a whole number >= 1"),
        ]:
            try:
                client.call(op, **arguments)
            except Exception as error:  # BusError: checked below
                assert getattr(error, "code", None) == "bad_request", error
                assert says in str(error)
            else:
                raise AssertionError(f"{op} {arguments} was accepted")
        assert client.ping() == "pong"


def test_dead_letters_survive_kill_9_with_the_spool_and_replay_works(
    start_busd, tmp_path
):
    record = tmp_path / "jobs.jsonl"
    spool = f'[busd]\nspool = "{tmp_path / "spool"}"\n\n'
    first = start_busd(config_text=spool + jobs(record, fixed=False))
    with first.client() as client:
        published = [client.publish("main", m)["id"] for m in MESSAGES]
        wait_for(lambda: dead_count(client) == 3, 20, "3 dead letters")
        letters = client.dead_letters()
    os.kill(first.pid, signal.SIGKILL)
    first.process.wait(10)

    second = start_busd(config_text=spool + jobs(record, fixed=True))
    with second.client() as client:
        # The same letters, and nothing delivered again from the spool.
        assert client.dead_letters() == letters
        state = client.state()
        assert (state["dead_letters"], state["brokers"]["jobs"]["accepted"]) == (3, 0)
        before = len(records(record))
        replay = client.dead_replay(*(d["id"] for d in letters))
        assert [r["id"] for r in replay["replayed"]] == [d["id"] for d in letters]
        assert replay["kept"] == [] and replay["count"] == 0
        assert min(r["message_id"] for r in replay["replayed"]) > max(published)
        wait_for(lambda: client.state()["brokers"]["jobs"]["acked"] == 3, 20, "3 acks")
    after = records(record)[before:]
    assert sorted(map(json.dumps, messages_of(after))) == sorted(
        map(json.dumps, MESSAGES)
    )
    assert "Dead-letter file " in second.log_text()
    assert "3 dead letters kept" in second.log_text()
    # Replayed and gone for good: a third busd finds none.
    os.kill(second.pid, signal.SIGKILL)
    second.process.wait(10)
    third = start_busd(config_text=spool + jobs(record, fixed=True))
    with third.client() as client:
        assert client.dead_letters() == []
    assert third.stop() == 0
