"""How fast is ``Bus.publish``? busd against CherryPy and a plain loop.

Each case publishes on one channel with 1, 3 or 10 trivial listeners,
through ``busd.Bus``, through ``cherrypy.process.wspbus.Bus``, and through
a plain Python loop that calls the same listeners and collects their
results (the floor: what any publish has to do). The implementations are
measured in turns, round after round, so that a slow patch of the machine
hits all of them alike; the table shows the median of the rounds.

Run from the repository root::

    .venv/bin/python bench/bus_publish.py            # print the table
    .venv/bin/python bench/bus_publish.py --write    # and update RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import timeit
from collections.abc import Callable
from typing import Any

from _common import RESULTS, machine, now, write_section
from cherrypy.process.wspbus import Bus as CherryPyBus

from busd.bus import Bus as BusdBus

LISTENER_COUNTS = (1, 3, 10)
IMPLEMENTATIONS = ("busd", "CherryPy", "plain loop")
CHANNEL = "main"
# Each timing runs for about this long; the number of calls is set once
# per case so that every round repeats exactly the same work.
SECONDS_PER_TIMING = 0.05
SECTION = "## Bus.publish"


def make_listeners(count: int) -> list[Callable[[], None]]:
    """Distinct trivial listeners (a set would merge equal ones)."""

    def make() -> Callable[[], None]:
        def listener() -> None:
            return None

        return listener

    return [make() for _ in range(count)]


def make_publishers(count: int) -> dict[str, Callable[[], Any]]:
    """One zero-argument callable per implementation, all doing one publish."""
    listeners = make_listeners(count)
    publishers: dict[str, Callable[[], Any]] = {}
    for name, bus_class in (("busd", BusdBus), ("CherryPy", CherryPyBus)):
        bus = bus_class()
        for priority, listener in enumerate(listeners):
            bus.subscribe(CHANNEL, listener, priority=priority)
        publishers[name] = bus.publish

    def plain_loop(channel: str) -> list[Any]:
        output = []
        for listener in listeners:
            output.append(listener())
        return output

    publishers["plain loop"] = plain_loop
    return publishers


def timer(publish: Callable[..., Any]) -> timeit.Timer:
    # A statement string, not a lambda: the call is timed with nothing
    # wrapped around it, the same way for every implementation.
    return timeit.Timer(f"publish({CHANNEL!r})", globals={"publish": publish})


def measure(repeats: int) -> dict[int, dict[str, list[float]]]:
    """Return ns per publish for each listener count, implementation, round."""
    results: dict[int, dict[str, list[float]]] = {}
    for count in LISTENER_COUNTS:
        publishers = make_publishers(count)
        timers = {name: timer(publishers[name]) for name in IMPLEMENTATIONS}
        numbers = {}
        for name, tm in timers.items():
            number, seconds = tm.autorange()
            numbers[name] = max(1, int(number * SECONDS_PER_TIMING / seconds))
        samples: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
        for round_ in range(repeats):
            # Rotate the order each round: no implementation always goes first.
            shift = round_ % len(IMPLEMENTATIONS)
            for name in IMPLEMENTATIONS[shift:] + IMPLEMENTATIONS[:shift]:
                seconds = timers[name].timeit(numbers[name])
                samples[name].append(seconds / numbers[name] * 1e9)
        results[count] = samples
    return results


def table(results: dict[int, dict[str, list[float]]]) -> str:
    lines = [
        "| listeners | implementation | median ns/publish | publishes/s "
        "| spread (min-max ns) | busd/CherryPy rate |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for count, samples in results.items():
        medians = {name: statistics.median(v) for name, v in samples.items()}
        ratio = medians["CherryPy"] / medians["busd"]
        for name in IMPLEMENTATIONS:
            median = medians[name]
            ratio_cell = f"**{ratio:.2f}x**" if name == "busd" else ""
            lines.append(
                f"| {count} | {name} | {median:,.0f} | {1e9 / median:,.0f} "
                f"| {min(samples[name]):,.0f}-{max(samples[name]):,.0f} "
                f"| {ratio_cell} |"
            )
    return "\n".join(lines)


def section(results: dict[int, dict[str, list[float]]], repeats: int, host: str) -> str:
    today = now()
    return (
        f"{SECTION}\n\n"
        f"Machine: {host}.  \n"
        f"Date: {today}.  \n"
        f"Command: `.venv/bin/python bench/bus_publish.py --write` "
        f"({repeats} interleaved rounds of ~{SECONDS_PER_TIMING * 1000:.0f} ms "
        "per implementation; median).\n\n"
        f"{table(results)}\n"
    )


def write_results(text: str) -> None:
    """Replace the ``## Bus.publish`` section of RESULTS.md (or add it)."""
    write_section(SECTION, text, RESULTS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="rounds (>= 7)")
    parser.add_argument(
        "--write", action="store_true", help=f"update {SECTION!r} in {RESULTS.name}"
    )
    args = parser.parse_args(argv)
    if args.repeats < 7:
        parser.error("--repeats must be at least 7")
    host = machine()  # before the run: the load average is the others'
    results = measure(args.repeats)
    print(f"Machine: {host}\n")
    print(table(results))
    if args.write:
        write_results(section(results, args.repeats, host))
        print(f"\nUpdated {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
