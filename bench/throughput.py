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
import collections
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common
import psutil
from _common import (
    BENCH,
    BUSD_PYTHON,
    PEERS,
    ROOT,
    child_env,
    free_port,
    machine,
    now,
    percentile,
    stop_tree,
    target_table,
    wait_until,
    write_section,
    write_targets,
)

sys.path.insert(0, str(ROOT))
from busctl.client import Client

SECTION = "## Publish -> ack throughput"
TARGET_RATE = 50_000
TARGET_LATENCY_RATIO = 3.0
MESSAGE = "BUY ABCD 10"

BUSD_CONFIG = """\
[brokers.bench]
handler = "bench_brokers:Noop"
cwd = "{bench}"
channels = ["main"]
instances = 2
queue_size = 1000000
"""


def start_busd(tmp: Path) -> tuple[subprocess.Popen, str]:
    """busd with the bench broker, once both its instances are RUNNING."""

    def running(sock: str) -> Callable[[], bool]:
        def check() -> bool:
            with Client(sock, timeout=2) as client:
                broker = client.state()["brokers"]["bench"]
            return all(i["state"] == "RUNNING" for i in broker["instances"])

        return check

    busd = [str(BUSD_PYTHON), "-m", "busd"]
    config = BUSD_CONFIG.format(bench=BENCH)
    return _common.start_busd(tmp, busd, child_env(), config, ready=running)


def start_echo(tmp: Path) -> tuple[subprocess.Popen, str]:
    return _common.start_echo(tmp, str(BUSD_PYTHON), child_env())


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
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
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
            order = list(ops) if round_ % 2 == 0 else list(ops)[::-1]
            for name in order:
                op = ops[name]
                for _ in range(per):
                    t = time.perf_counter_ns()
                    op()
                    samples[name].append((time.perf_counter_ns() - t) / 1000)
    return samples


def spy_busd(pid: int, sock: str, seconds: int, tmp: Path, messages: int) -> dict:
    """py-spy of busd during a publish --wait flood: where its time goes."""
    output = tmp / "py-spy-throughput.txt"
    spy = subprocess.Popen(
        [
            *(str(PEERS / "bin" / "py-spy"), "record", "--pid", str(pid)),
            *("--duration", str(seconds), "--rate", "200", "--format", "raw"),
            *("--output", str(output), "--nonblocking"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        deadline = time.monotonic() + seconds + 10
        while spy.poll() is None and time.monotonic() < deadline:
            busd_rate(sock, messages, 2, 1000, True)
        spy.wait(20)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    return summarise_spy(output.read_text())


def summarise_spy(raw: str) -> dict:
    threads: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    total = idle = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f]
        thread = frames[0].split(" (")[0] if frames else "?"
        threads[thread] += n
        if not any("_run_loop" in f for f in frames):
            continue
        total += n
        leaf = frames[-1].split(" (")[0]
        if leaf in ("EpollSelector.select", "select"):
            idle += n
            continue
        leaves[leaf] += n
        busd_frames = [f for f in frames if "busd/" in f]
        if busd_frames:
            own[busd_frames[-1].split(" (")[0]] += n
    return {"total": total, "idle": idle, "leaves": leaves, "own": own}


# -- Redis -------------------------------------------------------------------------


def redis_available() -> bool:
    return bool(shutil.which("redis-server") and shutil.which("redis-benchmark"))


def start_redis(tmp: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen(
        [
            "redis-server",
            *("--port", str(port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "no", "--daemonize", "no", "--dir", str(tmp)),
            *("--logfile", str(tmp / "redis.log")),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
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
    done = subprocess.run(
        [
            "redis-benchmark",
            *("-h", "127.0.0.1", "-p", str(port), "-n", str(messages)),
            *("-c", "4", "-P", "64", "--csv", "PUBLISH", "bench", MESSAGE),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    for line in done.stdout.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0].upper().startswith("PUBLISH"):
            return float(cells[1])
    raise RuntimeError(f"no PUBLISH line in redis-benchmark's output: {done.stdout}")


def redis_py(port: int, messages: int, calls: int) -> dict[str, Any]:
    done = subprocess.run(
        [
            str(PEERS / "bin" / "python"),
            str(BENCH / "redis_peer.py"),
            *("--port", str(port), "--messages", str(messages)),
            *("--calls", str(calls), "--window", "1000", "--message", MESSAGE),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(done.stdout)


# -- the run ---------------------------------------------------------------------


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"busd wait": [], "busd accepted": [], "notes": {}}
    processes: list[subprocess.Popen] = []
    try:
        busd, sock = start_busd(tmp)
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
    finally:
        for process in reversed(processes):
            stop_tree(process)
        processes.clear()
    if args.peers and redis_available():
        try:
            redis, port = start_redis(tmp)
            processes.append(redis)
            res["redis-benchmark"] = [
                redis_benchmark(port, args.messages * 4) for _ in range(args.repeats)
            ]
            res["redis-py"] = [
                redis_py(port, args.messages, args.calls if i == 0 else 0)
                for i in range(args.repeats)
            ]
        finally:
            for process in processes:
                stop_tree(process)
    elif args.peers:
        res["notes"]["redis"] = "redis-server/redis-benchmark not installed: skipped"
    return res


def report(res: dict[str, Any], args: argparse.Namespace) -> tuple[str, list[dict]]:
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
        leaves = ", ".join(
            f"`{name}` {n / busy:.0%}" for name, n in spy["leaves"].most_common(8)
        )
        own = ", ".join(
            f"`{name}` {n / busy:.0%}" for name, n in spy["own"].most_common(6)
        )
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
        {
            "figure": "publish -> ack, msg/s (publish_many wait=True)",
            "measured": f"{wait:,.0f}",
            "goal": f"≥ {TARGET_RATE:,}",
            "met": wait >= TARGET_RATE,
            "limits": limit_rate,
        },
        {
            "figure": "publish --wait p50 / echo round trip p50",
            "measured": f"{p50 / echo50:.2f}x ({p50:.0f} / {echo50:.0f} µs)",
            "goal": f"≤ {TARGET_LATENCY_RATIO:g}x",
            "met": p50 / echo50 <= TARGET_LATENCY_RATIO,
            "limits": limit_lat,
        },
    ]
    lines = [
        target_table(rows),
        "",
        "### Rates (median of the repetitions)",
        "",
        "| what | median msg/s | min-max | runs | / busd publish -> ack |",
        "|---|---:|---:|---:|---:|",
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
        "| what | p50 µs | p99 µs | calls | / echo round trip |",
        "|---|---:|---:|---:|---:|",
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test, no peers")
    parser.add_argument("--write", action="store_true", help=f"update {SECTION!r}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--messages", type=int, default=40_000)
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--targets-json", help="write the target rows here")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.messages, args.calls, args.profile = 1, 2000, 100, False
    elif args.repeats < 5:
        parser.error("--repeats must be at least 5")
    args.peers = not args.quick
    host = machine()
    with tempfile.TemporaryDirectory(prefix="busd-bench-") as tmp:
        res = run(args, Path(tmp))
    text, rows = report(res, args)
    print(f"Machine: {host}\n\n{text}")
    write_targets(args.targets_json, rows)
    if args.write:
        write_section(
            SECTION,
            f"{SECTION}\n\nMachine: {host}.  \nDate: {now()}.  \n"
            "Command: `bench/run` → `bench/throughput.py --write` "
            f"({args.repeats} repetitions of {args.messages:,} messages, median; "
            "broker `bench_brokers:Noop`, 2 instances; redis-server "
            "from Debian, redis-py from bench/.venv-peers).\n\n"
            f"{text}\n",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
