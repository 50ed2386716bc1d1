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
from pathlib import Path

from _procs import TMP_PREFIX, child_env, ending, noop_broker, start_busd
from _report import machine
from throughput import broker_running, busd_rate


def rate_of(tree: Path, messages: int, connections: int, window: int) -> float:
    """publish -> ack msg/s of busd run from ``tree`` (one fresh daemon)."""
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
        return busd_rate(sock, messages, connections, window, True)


def main(argv: list[str] | None = None) -> int:
    """Alternate the two checkouts; print rates, medians and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="checkout A (the old one)")
    parser.add_argument("b", type=Path, help="checkout B (the new one)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--messages", type=int, default=40_000)
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument("--window", type=int, default=1000)
    args = parser.parse_args(argv)
    for tree in (args.a, args.b):
        if not (tree / "busd" / "__init__.py").exists():
            parser.error(f"{tree} is not a busd checkout (no busd/__init__.py)")
    print(machine())
    rates: dict[str, list[float]] = {"A": [], "B": []}
    for round_number in range(args.rounds):
        order = ("A", "B") if round_number % 2 == 0 else ("B", "A")
        for label in order:
            tree = args.a if label == "A" else args.b
            rates[label].append(
                rate_of(tree, args.messages, args.connections, args.window)
            )
        print(
            f"round {round_number + 1} ({' '.join(order)}): "
            f"A {rates['A'][-1]:,.0f} msg/s, B {rates['B'][-1]:,.0f} msg/s",
            flush=True,
        )
    ratios = [b / a for a, b in zip(rates["A"], rates["B"], strict=True)]
    print(f"A {args.a}: median {statistics.median(rates['A']):,.0f} msg/s")
    print(f"B {args.b}: median {statistics.median(rates['B']):,.0f} msg/s")
    print(
        f"B/A per round: median {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
