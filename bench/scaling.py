"""Control round trip with 0, 100 and 1000 idle client connections (scenario 7).

busd (no brokers), the bare asyncio echo server (``echo_server.py``, the
floor) and, unless ``--quick``, supervisord (XML-RPC ``getState`` over its
Unix socket, one keep-alive connection) each get K extra connections that
are opened and then left idle; then one more client times round trips on
its own connection (``busctl.Client.ping`` for busd and the echo server).
K takes the values in turns, round after round (≥ 5 rounds), and the p50
is over all the calls at one K. RLIMIT_NOFILE is raised first (the
servers inherit it).

    .venv/bin/python bench/scaling.py [--quick] [--write]
"""

from __future__ import annotations

import argparse
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
from _common import (
    BUSD_PYTHON,
    ROOT,
    child_env,
    machine,
    now,
    percentile,
    stop_tree,
    target_table,
    write_section,
    write_targets,
)

sys.path.insert(0, str(ROOT))
import control
from throughput import start_echo

from busctl.client import Client

SECTION = "## Control round trip with idle clients"
IDLE_COUNTS = (0, 100, 1000)
# Not a target of the issue: a drift worth flagging.
DRIFT_LIMIT = 1.5


def raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(hard, max(needed, soft))
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class IdlePool:
    """K connections to one Unix socket that send nothing."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.socks: list[socket.socket] = []

    def resize(self, count: int) -> None:
        while len(self.socks) > count:
            self.socks.pop().close()
        while len(self.socks) < count:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.path)
            self.socks.append(sock)

    def close(self) -> None:
        self.resize(0)


def start_busd(tmp: Path) -> tuple[subprocess.Popen, str]:
    """busd from the working tree with no broker."""
    return _common.start_busd(tmp, [str(BUSD_PYTHON), "-m", "busd"], child_env())


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, dict[int, list[float]]]:
    processes: list[subprocess.Popen] = []
    pools: dict[str, IdlePool] = {}
    clients: dict[str, object] = {}
    try:
        busd, busd_sock = start_busd(tmp)
        processes.append(busd)
        echo, echo_sock = start_echo(tmp)
        processes.append(echo)
        clients["busd"] = Client(busd_sock)
        clients["echo server"] = Client(echo_sock)
        pools["busd"] = IdlePool(busd_sock)
        pools["echo server"] = IdlePool(echo_sock)
        if args.peers:
            control.ensure_peers(with_py_spy=False)
            supervisord, _conf, sup_sock = control.start_supervisord(tmp)
            processes.append(supervisord)
            clients["supervisord"] = control.SupervisorRPC(sup_sock)
            pools["supervisord"] = IdlePool(sup_sock)
        samples = {name: {k: [] for k in args.counts} for name in clients}
        for round_ in range(args.rounds):
            shift = round_ % len(args.counts)
            for k in args.counts[shift:] + args.counts[:shift]:
                for pool in pools.values():
                    pool.resize(k)
                time.sleep(0.2)
                for name, client in clients.items():
                    ping = client.ping
                    for _ in range(20):
                        ping()
                    for _ in range(args.calls):
                        t = time.perf_counter_ns()
                        ping()
                        samples[name][k].append((time.perf_counter_ns() - t) / 1000)
        return samples
    finally:
        for client in clients.values():
            client.close()
        for pool in pools.values():
            pool.close()
        for process in reversed(processes):
            stop_tree(process)


def report(samples: dict[str, dict[int, list[float]]], counts: list[int]) -> tuple:
    lines = [
        "| server | "
        + " | ".join(f"p50 µs, {k} idle" for k in counts)
        + f" | p99 µs, {counts[-1]} idle | p50 {counts[-1]} / {counts[0]} |",
        "|---|" + "---:|" * (len(counts) + 2),
    ]
    for name, by_k in samples.items():
        p50 = {k: statistics.median(v) for k, v in by_k.items()}
        lines.append(
            f"| {name} | "
            + " | ".join(f"{p50[k]:.1f}" for k in counts)
            + f" | {percentile(by_k[counts[-1]], 0.99):.1f} "
            f"| {p50[counts[-1]] / p50[counts[0]]:.2f}x |"
        )
    busd = {k: statistics.median(v) for k, v in samples["busd"].items()}
    drift = busd[counts[-1]] / busd[counts[0]]
    most, none = counts[-1], counts[0]
    rows = [
        {
            "figure": f"busd ping p50 with {most} idle clients / with {none}",
            "measured": f"{drift:.2f}x ({busd[most]:.0f} / {busd[none]:.0f} µs)",
            "goal": f"≤ {DRIFT_LIMIT}x (flat)",
            "met": drift <= DRIFT_LIMIT,
            "limits": (
                "idle connections cost an epoll loop nothing per wake-up; a "
                "drift means per-connection work per request (a scan of the "
                "client list, or timers per connection): profile busd's I/O "
                "thread with py-spy at both counts"
            ),
        }
    ]
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test, no peers")
    parser.add_argument("--write", action="store_true", help=f"update {SECTION!r}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1000, help="per round and K")
    parser.add_argument("--targets-json", help="write the target rows here")
    args = parser.parse_args(argv)
    args.counts = list(IDLE_COUNTS)
    args.peers = not args.quick
    if args.quick:
        args.rounds, args.calls, args.counts = 1, 100, [0, 20]
    elif args.rounds < 5:
        parser.error("--rounds must be at least 5")
    raise_nofile(4 * max(args.counts) + 256)
    host = machine()
    with tempfile.TemporaryDirectory(prefix="busd-bench-") as tmp:
        samples = measure(args, Path(tmp))
    text, rows = report(samples, args.counts)
    print(f"Machine: {host}\n\n{target_table(rows)}\n\n{text}")
    write_targets(args.targets_json, rows)
    if args.write:
        write_section(
            SECTION,
            f"{SECTION}\n\nMachine: {host}.  \nDate: {now()}.  \n"
            f"Command: `bench/run` → `bench/scaling.py --write` ({args.rounds} "
            f"rounds, K in turns, {args.calls:,} calls per server and K per round; "
            "supervisord 4.3.0 from bench/.venv-peers). The issue sets no "
            "figure here; the row below flags a p50 that does not stay flat.\n\n"
            f"{target_table(rows)}\n\n{text}\n",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
