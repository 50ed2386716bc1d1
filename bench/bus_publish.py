"""How fast is ``Bus.publish``, and subscribe + unsubscribe? busd against CherryPy.

Each case publishes on one channel with 1, 3 or 10 trivial listeners,
through ``busd.Bus``, through ``cherrypy.process.wspbus.Bus``, and through
a plain Python loop that calls the same listeners and collects their
results (the floor: what any publish has to do). Then, on the same
channels, one more listener subscribes and unsubscribes again (a pair),
on each bus; and a churn cycle (subscribe, publish, unsubscribe, publish)
shows what a change costs the publish that follows it, since busd sorts a
changed channel on its next publish. The implementations are measured in
turns, round after round, so that a slow patch of the machine hits all of
them alike; the tables show the median of the rounds.

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

from _report import finish, machine, options, parse, target, target_table
from _timing import rotated
from cherrypy.process.wspbus import Bus as CherryPyBus

from busd import Bus as BusdBus

LISTENER_COUNTS = (1, 3, 10)
IMPLEMENTATIONS = ("busd", "CherryPy", "plain loop")
BUSES = ("busd", "CherryPy")
CHANNEL = "main"
# Each timing runs for about this long; the number of calls is set once
# per case so that every round repeats exactly the same work.
SECONDS_PER_TIMING = 0.05
# --quick's: a smoke test runs every statement, its figures are not kept.
QUICK_SECONDS_PER_TIMING = 0.01
# How long the run that sets the number of calls lasts (timeit's autorange
# takes 0.2 s per timer: 4 s of the 21 timers).
CALIBRATION_SECONDS = 0.01
SECTION = "## Bus.publish"
# The fewest rounds that make a median worth writing; --quick's, as they
# take seconds.
QUICK_REPEATS = 7
# subscribe + unsubscribe: busd's pairs/s over CherryPy's, at every
# listener count (issue 16: it was 0.07x-0.13x, sorting on each change).
PAIR_RATIO_GOAL = 0.5
PAIR = "subscribe + unsubscribe"
CHURN = "subscribe, publish, unsubscribe, publish"


def make_listeners(count: int) -> list[Callable[[], None]]:
    """Distinct trivial listeners (a set would merge equal ones)."""

    def make() -> Callable[[], None]:
        def listener() -> None:
            return None

        return listener

    return [make() for _ in range(count)]


def make_buses(count: int) -> dict[str, Any]:
    """A bus of each implementation with ``count`` listeners on ``CHANNEL``,
    at distinct priorities."""
    listeners = make_listeners(count)
    buses: dict[str, Any] = {}
    for name, bus_class in (("busd", BusdBus), ("CherryPy", CherryPyBus)):
        bus = bus_class()
        for priority, listener in enumerate(listeners):
            bus.subscribe(CHANNEL, listener, priority=priority)
        buses[name] = bus
    return buses


def publish_timers(count: int) -> dict[str, timeit.Timer]:
    """One timer per implementation, each timing one publish on ``CHANNEL``."""
    buses = make_buses(count)
    listeners = make_listeners(count)

    def plain_loop(channel: str) -> list[Any]:
        output = []
        for listener in listeners:
            output.append(listener())
        return output

    publishers = {name: bus.publish for name, bus in buses.items()}
    publishers["plain loop"] = plain_loop
    # A statement string, not a lambda: the call is timed with nothing
    # wrapped around it, the same way for every implementation.
    return {
        name: timeit.Timer(f"publish({CHANNEL!r})", globals={"publish": publish})
        for name, publish in publishers.items()
    }


def change_timers(count: int, statement: str) -> dict[str, timeit.Timer]:
    """One timer per bus with ``count`` listeners, timing ``statement``.

    In it, ``extra`` is one more listener (subscribed the common way, its
    priority from the default), ``subscribe``, ``unsubscribe`` and
    ``publish`` the bus's methods.
    """
    (extra,) = make_listeners(1)
    return {
        name: timeit.Timer(
            statement,
            globals={
                "extra": extra,
                "subscribe": bus.subscribe,
                "unsubscribe": bus.unsubscribe,
                "publish": bus.publish,
            },
        )
        for name, bus in make_buses(count).items()
    }


def pair_timers(count: int) -> dict[str, timeit.Timer]:
    """Timers of one subscribe + unsubscribe pair of one more listener."""
    return change_timers(
        count, f"subscribe({CHANNEL!r}, extra); unsubscribe({CHANNEL!r}, extra)"
    )


def churn_timers(count: int) -> dict[str, timeit.Timer]:
    """Timers of a change and the publish after it, twice (see CHURN)."""
    return change_timers(
        count,
        f"subscribe({CHANNEL!r}, extra); publish({CHANNEL!r}); "
        f"unsubscribe({CHANNEL!r}, extra); publish({CHANNEL!r})",
    )


Samples = dict[int, dict[str, list[float]]]


def calls_per_timing(tm: timeit.Timer, seconds: float) -> int:
    """How many runs of ``tm``'s statement take about ``seconds``."""
    number = 1
    while True:
        elapsed = tm.timeit(number)
        if elapsed >= CALIBRATION_SECONDS:
            return max(1, int(number * seconds / elapsed))
        number *= 10


def measure(
    make_timers: Callable[[int], dict[str, timeit.Timer]],
    repeats: int,
    seconds: float = SECONDS_PER_TIMING,
) -> Samples:
    """Return ns per timed statement for each listener count, implementation
    and round; the implementations take turns within each round, each
    timing about ``seconds`` long."""
    results: Samples = {}
    for count in LISTENER_COUNTS:
        timers = make_timers(count)
        names = list(timers)
        numbers = {name: calls_per_timing(tm, seconds) for name, tm in timers.items()}
        samples: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(repeats):
            for name in rotated(names, round_):
                seconds = timers[name].timeit(numbers[name])
                samples[name].append(seconds / numbers[name] * 1e9)
        results[count] = samples
    return results


def ratios(results: Samples) -> dict[int, float]:
    """busd's rate over CherryPy's (median over median), per listener count."""
    return {
        count: statistics.median(samples["CherryPy"])
        / statistics.median(samples["busd"])
        for count, samples in results.items()
    }


def table(results: Samples, what: str = "publish", whats: str = "publishes") -> str:
    """The markdown table: median per listener count and implementation;
    ``what`` (plural ``whats``) names one timed statement in the headings."""
    lines = [
        f"| listeners | implementation | median ns/{what} | {whats}/s "
        "| spread (min-max ns) | busd/CherryPy rate |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    busd_over_cherrypy = ratios(results)
    for count, samples in results.items():
        for name, values in samples.items():
            median = statistics.median(values)
            ratio = busd_over_cherrypy[count]
            ratio_cell = f"**{ratio:.2f}x**" if name == "busd" else ""
            lines.append(
                f"| {count} | {name} | {median:,.0f} | {1e9 / median:,.0f} "
                f"| {min(values):,.0f}-{max(values):,.0f} "
                f"| {ratio_cell} |"
            )
    return "\n".join(lines)


def pair_target(pairs: Samples) -> dict:
    """The target row: busd's pairs/s over CherryPy's, the worst count."""
    by_count = ratios(pairs)
    worst = min(by_count.values())
    each = ", ".join(f"{r:.2f}x with {n}" for n, r in by_count.items())
    return target(
        f"{PAIR} pairs/s, busd / CherryPy (worst of "
        f"{', '.join(map(str, LISTENER_COUNTS))} listeners)",
        f"{worst:.2f}x",
        f"≥ {PAIR_RATIO_GOAL}x",
        worst >= PAIR_RATIO_GOAL,
        limits=f"per listener count: {each}",
    )


def main(argv: list[str] | None = None) -> int:
    """Time the publishes, print the table; with ``--write`` update RESULTS.md."""
    parser = options(__doc__, quick=f"smoke test: {QUICK_REPEATS} rounds")
    parser.add_argument("--repeats", type=int, default=9, help="rounds (>= 7)")
    args = parse(parser, argv, at_least={"repeats": QUICK_REPEATS})
    if args.quick:
        args.repeats = QUICK_REPEATS
    host = machine()  # before the run: the load average is the others'
    seconds = QUICK_SECONDS_PER_TIMING if args.quick else SECONDS_PER_TIMING
    publishes = measure(publish_timers, args.repeats, seconds)
    pairs = measure(pair_timers, args.repeats, seconds)
    churns = measure(churn_timers, args.repeats, seconds)
    rows = [pair_target(pairs)]
    # The publish figures stand beside CherryPy's, not against a goal.
    text = "\n\n".join(
        [
            target_table(rows),
            table(publishes),
            f"### {PAIR}\n\nOne more listener subscribes (its priority the "
            "default) and unsubscribes again, on the channels above; a pair "
            "is both calls.\n\n" + table(pairs, "pair", "pairs"),
            f"### {CHURN}\n\nA change and the publish after it, twice: "
            "busd sorts a changed channel on its next publish, CherryPy on "
            "every publish.\n\n" + table(churns, "cycle", "cycles"),
        ]
    )
    command = (
        "`.venv/bin/python bench/bus_publish.py --write` "
        f"({args.repeats} interleaved rounds of ~{SECONDS_PER_TIMING * 1000:.0f} ms "
        "per implementation and table; median)."
    )
    return finish(args, host, text, rows, [(SECTION, command, text)])


if __name__ == "__main__":
    sys.exit(main())
