"""A worker that hangs on a message: ack_timeout moves its work elsewhere."""

import psutil
from helpers import broker, records, rows, wait_for


def test_a_hung_worker_is_killed_and_its_messages_move_on(start_busd, tmp_path):
    record = tmp_path / "record.jsonl"
    config = broker(
        "orders",
        "brokers_for_tests:HangOn",
        record,
        env={"HANG_ON": "hang once"},
        instances=2,
        ack_timeout=1.0,
        max_retries=3,
        restart="always",
    )
    daemon = start_busd(config)
    with daemon.client(timeout=30) as client:
        first = {row["index"]: row["pid"] for row in rows(client, "orders")}
        # The instance that gets "hang once" hangs; the message after it
        # on the same instance is stuck behind it until the kill.
        client.publish("main", "hang once")
        client.publish_many("main", [f"m{i}" for i in range(10)])
        wait_for(
            lambda: (
                {f"m{i}" for i in range(10)} <= {r["message"] for r in records(record)}
            ),
            timeout=20,
            what="every message to be handled despite the hung worker",
        )
        wait_for(
            lambda: "not acknowledged within 1 s" in daemon.log_text(),
            timeout=20,
            what="the ack_timeout log line",
        )
        # The hung worker was killed (and restarted under restart = always).
        hung = [pid for pid in first.values() if not psutil.pid_exists(pid)]
        assert hung, "no worker was killed"
    log = daemon.log_text()
    assert "the worker is taken as hung and killed" in log
    assert "killed by SIGKILL" in log
    assert daemon.stop() == 0


def test_a_message_that_hangs_every_worker_goes_dead(start_busd, tmp_path):
    record = tmp_path / "record.jsonl"
    config = broker(
        "orders",
        "brokers_for_tests:HangOn",
        record,
        env={"HANG_ON": "poison"},
        instances=2,
        ack_timeout=0.5,
        max_retries=1,
        restart="always",
    )
    daemon = start_busd(config)
    with daemon.client(timeout=30) as client:
        dead = client.subscribe("dead")
        client.publish("main", "poison")
        letter = dead.next_event(30)["message"]
        assert letter["message"] == "poison"
        assert letter["broker"] == "orders"
        assert all("not acknowledged within 0.5 s" in e for e in letter["errors"])
        assert len(letter["errors"]) == 2  # max_retries + 1 workers hung on it
        # The broker carries on with the next message.
        client.call("publish", channel="main", message="fine", wait=True)
    assert "fine" in [r["message"] for r in records(record)]
    assert daemon.stop() == 0
