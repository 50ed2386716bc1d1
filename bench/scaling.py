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
import sys
import time
from pathlib import Path

from _procs import (
    SupervisorRPC,
    closing_all,
    ending,
    ensure_peers,
    measured,
    peer_version,
    start_busd,
    start_echo,
    start_supervisord,
)
from _report import finish, options, parse, table_head, target, target_table
from _timing import percentile, rotated, sample_us

from busctl import Client

SECTION = "## Control round trip with idle clients"
IDLE_COUNTS = (0, 100, 1000)
# Not a target of the issue: a drift worth flagging.
DRIFT_LIMIT = 1.5


def raise_nofile(needed: int) -> None:
    """Raise the soft RLIMIT_NOFILE to ``needed`` (as far as the hard one allows)."""
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
        """Open or close connections until there are ``count``."""
        while len(self.socks) > count:
            self.socks.pop().close()
        while len(self.socks) < count:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.path)
            self.socks.append(sock)

    def close(self) -> None:
        """Close every connection."""
        self.resize(0)


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, dict[int, list[float]]]:
    """Round trip samples (µs): server -> K idle connections -> samples."""
    pools: dict[str, IdlePool] = {}
    clients: dict[str, object] = {}
    with ending() as processes, closing_all(pools), closing_all(clients):
        busd, busd_sock = start_busd(tmp)  # no broker
        processes.append(busd)
        echo, echo_sock = start_echo(tmp)
        processes.append(echo)
        clients["busd"] = Client(busd_sock)
        clients["echo server"] = Client(echo_sock)
        pools["busd"] = IdlePool(busd_sock)
        pools["echo server"] = IdlePool(echo_sock)
        if args.peers:
            ensure_peers(["supervisor"])
            supervisord, sup_sock, _conf = start_supervisord(tmp)
            processes.append(supervisord)
            clients["supervisord"] = SupervisorRPC(sup_sock)
            pools["supervisord"] = IdlePool(sup_sock)
        samples = {name: {k: [] for k in args.counts} for name in clients}
        for round_ in range(args.rounds):
            for k in rotated(args.counts, round_):
                for pool in pools.values():
                    pool.resize(k)
                time.sleep(0.2)
                for name, client in clients.items():
                    ping = client.ping
                    for _ in range(20):
                        ping()
                    sample_us(ping, args.calls, samples[name][k])
        return samples


def report(samples: dict[str, dict[int, list[float]]], counts: list[int]) -> tuple:
    """The p50 table by idle count, and the drift row."""
    lines = table_head(
        "server",
        *(f"p50 µs, {k} idle" for k in counts),
        f"p99 µs, {counts[-1]} idle",
        f"p50 {counts[-1]} / {counts[0]}",
    )
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
        target(
            f"busd ping p50 with {most} idle clients / with {none}",
            f"{drift:.2f}x ({busd[most]:.0f} / {busd[none]:.0f} µs)",
            f"≤ {DRIFT_LIMIT}x (flat)",
            drift <= DRIFT_LIMIT,
            "idle connections cost an epoll loop nothing per wake-up; a "
            "drift means per-connection work per request (a scan of the "
            "client list, or timers per connection): profile busd's I/O "
            "thread with py-spy at both counts",
        )
    ]
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    """Take the samples, print the table; with ``--write`` update RESULTS.md."""
    parser = options(__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1000, help="per round and K")
    args = parse(parser, argv, at_least={"rounds": 5})
    args.counts = list(IDLE_COUNTS)
    args.peers = not args.quick
    if args.quick:
        args.rounds, args.calls, args.counts = 1, 100, [0, 20]
    raise_nofile(4 * max(args.counts) + 256)
    host, samples = measured(lambda tmp: measure(args, tmp))
    text, rows = report(samples, args.counts)
    text = f"{target_table(rows)}\n\n{text}"
    command = (
        f"`bench/run` → `bench/scaling.py --write` ({args.rounds} "
        f"rounds, K in turns, {args.calls:,} calls per server and K per round; "
        f"supervisord {peer_version('supervisor')} from bench/.venv-peers). The "
        "issue sets no figure here; the row below flags a p50 that does not "
        "stay flat."
    )
    return finish(args, host, text, rows, [(SECTION, command, text)])


if __name__ == "__main__":
    sys.exit(main())
