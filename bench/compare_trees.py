"""Publish -> ack through two checkouts of busd, taking turns (A B B A ...).

For a change that must not make the hot path slower: the same benchmark as
throughput.py's "publish -> ack" (broker ``bench_brokers:Noop``, 2
instances; 2 publishing processes, window 1000, ``wait=True``), with busd
run from checkout A, then from checkout B, alternating the order each
round so that a machine that speeds up or slows down during the run
favours neither. Prints each round's rates, the medians, and the median of
the per-round ratios B/A.

Run from the repository root::

    .venv/bin/python bench/compare_trees.py OLD_CHECKOUT NEW_CHECKOUT [--rounds 8]

e.g. ``git worktree add /tmp/old <commit>`` for OLD_CHECKOUT.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path

from _procs import TMP_PREFIX, child_env, ending, noop_broker, start_busd
from _report import machine
from _timing import sample_us
from throughput import MESSAGE, broker_running, busd_rate

from busctl import Client


def measure(
    tree: Path, messages: int, connections: int, window: int, calls: int
) -> tuple[float, float]:
    """publish -> ack msg/s, and one publish --wait's p50 in µs, of busd run
    from ``tree`` (one fresh daemon)."""
    env = child_env()
    env["PYTHONPATH"] = str(tree)
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX) as scratch, ending() as procs:
        busd, sock = start_busd(
            Path(scratch),
            noop_broker(channels='["main"]', instances=2, queue_size=1000000),
            ready=broker_running,
            env=env,
        )
        procs.append(busd)
        busd_rate(sock, 2000, 1, 256, True)  # warm up, as throughput.py does
        rate = busd_rate(sock, messages, connections, window, True)
        samples: list[float] = []
        with Client(sock) as client:
            publish = partial(
                client.call, "publish", channel="main", message=MESSAGE, wait=True
            )
            for _ in range(50):
                publish()
            sample_us(publish, calls, samples)
        return rate, statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    """Alternate the two checkouts; print rates, medians and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="checkout A (the old one)")
    parser.add_argument("b", type=Path, help="checkout B (the new one)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--messages", type=int, default=40_000)
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=2000, help="publish --wait calls")
    args = parser.parse_args(argv)
    for tree in (args.a, args.b):
        if not (tree / "busd" / "__init__.py").exists():
            parser.error(f"{tree} is not a busd checkout (no busd/__init__.py)")
    print(machine())
    rates: dict[str, list[float]] = {"A": [], "B": []}
    waits: dict[str, list[float]] = {"A": [], "B": []}
    for round_number in range(args.rounds):
        order = ("A", "B") if round_number % 2 == 0 else ("B", "A")
        for label in order:
            tree = args.a if label == "A" else args.b
            rate, wait_us = measure(
                tree, args.messages, args.connections, args.window, args.calls
            )
            rates[label].append(rate)
            waits[label].append(wait_us)
        print(
            f"round {round_number + 1} ({' '.join(order)}): "
            f"A {rates['A'][-1]:,.0f} msg/s {waits['A'][-1]:.0f} µs, "
            f"B {rates['B'][-1]:,.0f} msg/s {waits['B'][-1]:.0f} µs",
            flush=True,
        )
    for label, tree in (("A", args.a), ("B", args.b)):
        print(
            f"{label} {tree}: median {statistics.median(rates[label]):,.0f} msg/s, "
            f"publish --wait p50 {statistics.median(waits[label]):.0f} µs"
        )
    for figure, values in (("msg/s", rates), ("publish --wait p50", waits)):
        ratios = [b / a for a, b in zip(values["A"], values["B"], strict=True)]
        print(
            f"B/A {figure} per round: median {statistics.median(ratios):.3f} "
            f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
