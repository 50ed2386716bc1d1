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

import statistics
import sys
import timeit
from collections.abc import Callable
from typing import Any

from _report import finish, machine, options, parse
from _timing import rotated
from cherrypy.process.wspbus import Bus as CherryPyBus

from busd import Bus as BusdBus

LISTENER_COUNTS = (1, 3, 10)
IMPLEMENTATIONS = ("busd", "CherryPy", "plain loop")
CHANNEL = "main"
# Each timing runs for about this long; the number of calls is set once
# per case so that every round repeats exactly the same work.
SECONDS_PER_TIMING = 0.05
SECTION = "## Bus.publish"
# The fewest rounds that make a median worth writing; --quick's, as they
# take seconds.
QUICK_REPEATS = 7


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
    """A timeit.Timer of one publish on ``CHANNEL``."""
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
            for name in rotated(IMPLEMENTATIONS, round_):
                seconds = timers[name].timeit(numbers[name])
                samples[name].append(seconds / numbers[name] * 1e9)
        results[count] = samples
    return results


def table(results: dict[int, dict[str, list[float]]]) -> str:
    """The markdown table: median per listener count and implementation."""
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


def main(argv: list[str] | None = None) -> int:
    """Time the publishes, print the table; with ``--write`` update RESULTS.md."""
    parser = options(__doc__, quick=f"smoke test: {QUICK_REPEATS} rounds")
    parser.add_argument("--repeats", type=int, default=9, help="rounds (>= 7)")
    args = parse(parser, argv, at_least={"repeats": QUICK_REPEATS})
    if args.quick:
        args.repeats = QUICK_REPEATS
    host = machine()  # before the run: the load average is the others'
    results = measure(args.repeats)
    text = table(results)
    command = (
        "`.venv/bin/python bench/bus_publish.py --write` "
        f"({args.repeats} interleaved rounds of ~{SECONDS_PER_TIMING * 1000:.0f} ms "
        "per implementation; median)."
    )
    # No targets: the figures stand beside CherryPy's, not against a goal.
    return finish(args, host, text, [], [(SECTION, command, text)])


if __name__ == "__main__":
    sys.exit(main())
