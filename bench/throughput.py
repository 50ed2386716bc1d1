"""Publish -> ack through busd, against Redis PUBLISH (scenario 3).

busd runs one broker, ``bench_brokers:Noop`` (returns at once: an ack),
with 2 instances. Client processes (``busctl.Client.publish_many``, a large
window) publish short strings:

- with ``wait=True``: each answer comes once a worker acknowledged the
  message, so the rate is publish -> broker queue -> worker -> ack -> answer;
- without ``wait``: the answer says busd accepted (queued) the message.

Latency: one ``publish --wait`` at a time on one connection, p50, against
the bare asyncio echo round trip (``echo_server.py``, ``Client.ping``), in
interleaved chunks.

Redis (``redis-server`` from Debian, on 127.0.0.1 and a free port):
``redis-benchmark`` sending ``PUBLISH`` pipelined (its own C client, no
subscriber), and redis-py (from bench/.venv-peers, run by
``redis_peer.py``) pipelining ``PUBLISH`` while another process subscribes:
the rate at which messages reach the subscriber; and one PUBLISH at a time,
p50. Redis has no acknowledgement: delivered to a subscriber is its end.

Run from the repository root (bench/run does)::

    .venv/bin/python bench/throughput.py [--quick] [--write]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from _procs import (
    BENCH,
    PEERS,
    ending,
    free_port,
    join_or_kill,
    measured,
    noop_broker,
    quiet,
    redis_available,
    start_busd,
    start_echo,
    stdout_of,
    wait_until,
)
from _report import finish, options, parse, table_head, target, target_table
from _timing import percentile, rotated, sample_us, shares, spy_io_thread

from busctl import Client

SECTION = "## Publish -> ack throughput"
TARGET_RATE = 50_000
TARGET_LATENCY_RATIO = 3.0
MESSAGE = "BUY ABCD 10"


def broker_running(sock: str) -> Callable[[], bool]:
    """A check for ``start_busd``: both instances of the bench broker run."""

    def check() -> bool:
        with Client(sock, timeout=2) as client:
            broker = client.state()["brokers"]["bench"]
        return all(i["state"] == "RUNNING" for i in broker["instances"])

    return check


def _publisher(sock: str, count: int, window: int, wait: bool, barrier, out) -> None:
    with Client(sock, timeout=60) as client:
        client.ping()
        barrier.wait()
        start = time.perf_counter()  # CLOCK_MONOTONIC: one clock for all
        results = client.publish_many("main", [MESSAGE] * count, window, wait)
        end = time.perf_counter()
    acked = sum(r.get("acked", 0) for r in results) if wait else len(results)
    out.put((start, end, acked))


def drain(sock: str) -> None:
    """Wait until the broker has settled everything it accepted."""
    with Client(sock) as client:
        while True:
            broker = client.state()["brokers"]["bench"]
            if broker["queued"] == 0 and broker["acked"] >= broker["accepted"]:
                return
            time.sleep(0.05)


def busd_rate(
    sock: str, messages: int, connections: int, window: int, wait: bool
) -> float:
    """Messages per second over ``connections`` publishing processes."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(connections)
    out = ctx.Queue()
    per = messages // connections
    procs = [
        ctx.Process(target=_publisher, args=(sock, per, window, wait, barrier, out))
        for _ in range(connections)
    ]
    for proc in procs:
        proc.start()
    try:
        spans = [out.get(timeout=300) for _ in procs]
    finally:
        for proc in procs:
            join_or_kill(proc)
    done = sum(acked for *_t, acked in spans)
    if done != per * connections:
        raise RuntimeError(f"only {done} of {per * connections} messages settled")
    seconds = max(end for _s, end, _a in spans) - min(s for s, _e, _a in spans)
    if not wait:
        drain(sock)
    return done / seconds


def cpu_split(busd: subprocess.Popen, run) -> dict[str, float]:
    """CPU seconds of busd, its workers and everything else during ``run()``."""
    me = psutil.Process(busd.pid)
    workers = [psutil.Process(pid) for pid in (c.pid for c in me.children())]

    def times(proc: psutil.Process) -> float:
        t = proc.cpu_times()
        return t.user + t.system

    total_before = sum(psutil.cpu_times()[:3])
    before = {"busd": times(me), "workers": sum(times(w) for w in workers)}
    wall = time.perf_counter()
    run()
    wall = time.perf_counter() - wall
    split = {
        "busd": times(me) - before["busd"],
        "workers": sum(times(w) for w in workers) - before["workers"],
    }
    split["all"] = sum(psutil.cpu_times()[:3]) - total_before
    split["other"] = split["all"] - split["busd"] - split["workers"]
    split["wall"] = wall
    return split


def latency(busd_sock: str, echo_sock: str, calls: int, rounds: int) -> dict:
    """Microseconds of one publish --wait and of one echo ping, in turns."""
    samples: dict[str, list[float]] = {"publish --wait": [], "echo ping": []}
    with Client(busd_sock) as busd, Client(echo_sock) as echo:
        ops = {
            "publish --wait": lambda: busd.call(
                "publish", channel="main", message=MESSAGE, wait=True
            ),
            "echo ping": echo.ping,
        }
        for op in ops.values():
            for _ in range(50):
                op()
        per = max(1, calls // rounds)
        for round_ in range(rounds):
            for name in rotated(list(ops), round_):
                sample_us(ops[name], per, samples[name])
    return samples


def spy_busd(pid: int, sock: str, seconds: int, tmp: Path, messages: int) -> dict:
    """py-spy of busd during a publish --wait flood: where its time goes."""
    # busd's I/O thread; waiting in select is idle time.
    return spy_io_thread(
        pid,
        tmp / "py-spy-throughput.txt",
        seconds,
        200,
        lambda: busd_rate(sock, messages, 2, 1000, True),
        lambda frames: any("IOLoop._run" in f for f in frames),
        {"EpollSelector.select", "select"},
        nonblocking=True,
        settle=0.5,
    )


# -- Redis -------------------------------------------------------------------------


def start_redis(tmp: Path) -> tuple[subprocess.Popen, int]:
    """redis-server on 127.0.0.1 and a free port, no persistence."""
    port = free_port()
    process = quiet(
        [
            "redis-server",
            *("--port", str(port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "no", "--daemonize", "no", "--dir", str(tmp)),
            *("--logfile", str(tmp / "redis.log")),
        ]
    )

    def answers() -> bool:
        done = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(port), "ping"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return done.stdout.strip() == "PONG"

    if shutil.which("redis-cli"):
        wait_until(answers, process, "redis-server")
    else:
        time.sleep(0.5)
    return process, port


def redis_benchmark(port: int, messages: int) -> float:
    """redis-benchmark's PUBLISH rate (its C client, pipelined, no subscriber)."""
    out = stdout_of(
        [
            "redis-benchmark",
            *("-h", "127.0.0.1", "-p", str(port), "-n", str(messages)),
            *("-c", "4", "-P", "64", "--csv", "PUBLISH", "bench", MESSAGE),
        ],
        timeout=120,
    )
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0].upper().startswith("PUBLISH"):
            return float(cells[1])
    raise RuntimeError(f"no PUBLISH line in redis-benchmark's output: {out}")


def redis_py(port: int, messages: int, calls: int) -> dict[str, Any]:
    """redis_peer.py's figures: delivered to a subscriber per second, latency."""
    out = stdout_of(
        [
            str(PEERS / "bin" / "python"),
            str(BENCH / "redis_peer.py"),
            *("--port", str(port), "--messages", str(messages)),
            *("--calls", str(calls), "--window", "1000", "--message", MESSAGE),
        ],
        timeout=300,
    )
    return json.loads(out)


# -- the run ---------------------------------------------------------------------


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """busd's rates and latency, then (unless --quick) Redis's."""
    res: dict[str, Any] = {"busd wait": [], "busd accepted": [], "notes": {}}
    with ending() as processes:
        busd, sock = start_busd(
            tmp,
            noop_broker(channels='["main"]', instances=2, queue_size=1000000),
            ready=broker_running,
        )
        processes.append(busd)
        echo, echo_sock = start_echo(tmp)
        processes.append(echo)
        busd_rate(sock, 2000, 1, 256, True)  # warm up
        for _ in range(args.repeats):
            res["busd wait"].append(
                busd_rate(sock, args.messages, args.connections, args.window, True)
            )
            res["busd accepted"].append(
                busd_rate(sock, args.messages, args.connections, args.window, False)
            )
        res["cpu"] = cpu_split(
            busd,
            lambda: busd_rate(sock, args.messages, args.connections, args.window, True),
        )
        res["latency"] = latency(
            sock, echo_sock, args.calls, 10 if args.calls > 500 else 2
        )
        rate = statistics.median(res["busd wait"])
        if rate < TARGET_RATE and args.profile and (PEERS / "bin" / "py-spy").exists():
            res["spy"] = spy_busd(busd.pid, sock, 4, tmp, args.messages)
    if args.peers and redis_available():
        with ending() as processes:
            redis, port = start_redis(tmp)
            processes.append(redis)
            res["redis-benchmark"] = [
                redis_benchmark(port, args.messages * 4) for _ in range(args.repeats)
            ]
            res["redis-py"] = [
                redis_py(port, args.messages, args.calls if i == 0 else 0)
                for i in range(args.repeats)
            ]
    elif args.peers:
        res["notes"]["redis"] = "redis-server/redis-benchmark not installed: skipped"
    return res


def report(res: dict[str, Any], args: argparse.Namespace) -> tuple[str, list[dict]]:
    """The tables and the target rows (with what limits a missed one)."""
    wait = statistics.median(res["busd wait"])
    lat = res["latency"]
    p50 = statistics.median(lat["publish --wait"])
    echo50 = statistics.median(lat["echo ping"])
    cpu = res["cpu"]
    cores = os.cpu_count() or 1
    limit_rate = (
        f"on {cores} cores the flood kept the machine {cpu['all'] / cpu['wall']:.0%} "
        f"of one core busy in all: busd's own process {cpu['busd'] / cpu['wall']:.0%} "
        f"(its I/O thread does every frame, Python, one core at most), the 2 "
        f"workers {cpu['workers'] / cpu['wall']:.0%}, the client processes and "
        f"the rest {cpu['other'] / cpu['wall']:.0%}"
    )
    spy = res.get("spy")
    if spy and spy["total"]:
        busy = spy["total"] - spy["idle"]
        leaves = shares(spy["leaves"], busy, 8)
        own = shares(spy["own"], busy, 6)
        limit_rate += (
            f"; py-spy on busd's I/O thread: busy in {busy / spy['total']:.0%} of "
            f"{spy['total']} samples; innermost frames: {leaves}; innermost busd "
            f"frame: {own}. Per message busd decodes a request frame, routes it, "
            "encodes a `deliver` frame, takes its ack (one frame per read of "
            "the worker) and encodes the answer, all in the callbacks that "
            "read them, with one write per socket or pipe per read: what is "
            "left is that Python work on busd's one I/O thread, and the "
            "machine's cores shared with the clients and workers"
        )
    limit_lat = (
        "a publish --wait crosses busd twice and a worker process once "
        "(client -> busd -> worker pipe -> busd -> client): three extra "
        "process wake-ups and two extra frames over the echo round trip"
    )
    rows = [
        target(
            "publish -> ack, msg/s (publish_many wait=True)",
            f"{wait:,.0f}",
            f"≥ {TARGET_RATE:,}",
            wait >= TARGET_RATE,
            limit_rate,
        ),
        target(
            "publish --wait p50 / echo round trip p50",
            f"{p50 / echo50:.2f}x ({p50:.0f} / {echo50:.0f} µs)",
            f"≤ {TARGET_LATENCY_RATIO:g}x",
            p50 / echo50 <= TARGET_LATENCY_RATIO,
            limit_lat,
        ),
    ]
    lines = [
        target_table(rows),
        "",
        "### Rates (median of the repetitions)",
        "",
        *table_head("what", "median msg/s", "min-max", "runs", "/ busd publish -> ack"),
    ]

    def rate_row(name: str, values: list[float]) -> None:
        med = statistics.median(values)
        lines.append(
            f"| {name} | {med:,.0f} | {min(values):,.0f}-{max(values):,.0f} "
            f"| {len(values)} | {med / wait:.2f}x |"
        )

    rate_row(
        f"busd publish -> ack ({args.connections} connections, window "
        f"{args.window}, wait=True)",
        res["busd wait"],
    )
    rate_row("busd publish, accepted (no wait)", res["busd accepted"])
    if "redis-benchmark" in res:
        rate_row(
            "redis-benchmark `PUBLISH` (C client, 4 connections, -P 64, no subscriber)",
            res["redis-benchmark"],
        )
        rate_row(
            "redis-py pipelined `PUBLISH` → delivered to a subscriber process",
            [r["delivered_per_s"] for r in res["redis-py"]],
        )
    lines += [
        "",
        "### One message at a time (p50, interleaved chunks)",
        "",
        *table_head("what", "p50 µs", "p99 µs", "calls", "/ echo round trip"),
    ]
    for name, label in (
        ("publish --wait", "busd `publish --wait` (busctl.Client)"),
        ("echo ping", "echo server round trip (busctl.Client.ping)"),
    ):
        s = lat[name]
        lines.append(
            f"| {label} | {statistics.median(s):.0f} | {percentile(s, 0.99):.0f} "
            f"| {len(s):,} | {statistics.median(s) / echo50:.2f}x |"
        )
    if "redis-py" in res and res["redis-py"][0].get("latency"):
        s = res["redis-py"][0]["latency"]
        lines.append(
            f"| redis-py single `PUBLISH` round trip | {statistics.median(s):.0f} "
            f"| {percentile(s, 0.99):.0f} | {len(s):,} "
            f"| {statistics.median(s) / echo50:.2f}x |"
        )
    for note in res["notes"].values():
        lines += ["", f"Note: {note}."]
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    """Take the figures, print them; with ``--write`` update RESULTS.md."""
    parser = options(__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--messages", type=int, default=40_000)
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    args = parse(parser, argv, at_least={"repeats": 5})
    if args.quick:
        args.repeats, args.messages, args.calls, args.profile = 1, 2000, 100, False
    args.peers = not args.quick
    host, res = measured(lambda tmp: run(args, tmp))
    text, rows = report(res, args)
    command = (
        "`bench/run` → `bench/throughput.py --write` "
        f"({args.repeats} repetitions of {args.messages:,} messages, median; "
        "broker `bench_brokers:Noop`, 2 instances; redis-server "
        "from Debian, redis-py from bench/.venv-peers)."
    )
    return finish(args, host, text, rows, [(SECTION, command, text)])


if __name__ == "__main__":
    sys.exit(main())
