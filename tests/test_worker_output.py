"""Worker output: what busd makes of the lines a worker writes to stderr.

Each line becomes a log entry of its broker, instance and PID, in
``busctl logs`` and in busd's own log; a line longer than MAX_LOG_LINE is
one entry, cut; a worker flooding stderr does not block busd; and a
``logs`` answer fits in one frame and says how many older lines it left
out.

Every test starts a real daemon (``start_busd``) whose brokers are real
worker processes: ``examples.stock:OrderBroker`` or the ``Flooder`` of
tests/brokers_for_tests.py. What a worker writes to stdout (the broker
protocol's frames) is tested in test_broker_protocol.py, and garbage on
that pipe in reliability/test_worker_faults.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

from helpers import broker, log_lines, records, rows, wait_for

from busd.supervision.pipes import MAX_LOG_LINE

# -- worker lines in logs and busd.log -------------------------------------------------


BUSCTL = [sys.executable, "-m", "busctl"]


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


# -- long lines and floods -------------------------------------------------------------


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
    # A sanity bound, not a figure: a ping takes ~4 ms at most during the
    # flood, but up to about a second on a loaded 2-core machine; 5 s only
    # fails if busd stops answering while it reads the flood.
    assert slowest < 5.0, f"a ping took {slowest:.2f} s during the flood"
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
