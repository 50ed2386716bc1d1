"""What a benchmark says: its options, the machine line, its tables, RESULTS.md.

Every benchmark takes ``--quick`` (a smoke run), ``--write`` (update its
``##`` section of RESULTS.md) and ``--targets-json PATH`` (hand its target
rows to bench/run), prints ``Machine: ...`` and its tables, and writes a
section headed by the machine, the date and the command. Standard library
only: the peers' interpreter runs fleet.py, which imports this.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("RESULTS.md")


# -- options -------------------------------------------------------------------


def options(
    doc: str, quick: str = "smoke test, no peers", targets: bool = True
) -> argparse.ArgumentParser:
    """A parser with the options every benchmark takes; ``doc`` its docstring.

    ``quick`` is the help of ``--quick``; ``targets`` adds ``--targets-json``
    (bench/run itself, which reads the rows, has none).
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument(
        "--write", action="store_true", help=f"update its section of {RESULTS.name}"
    )
    if targets:
        parser.add_argument("--targets-json", help="write the target rows here")
    return parser


def parse(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    at_least: Mapping[str, int] | None = None,
) -> argparse.Namespace:
    """Parse ``argv``; refuse ``--quick --write`` and, unless ``--quick``
    (which sets its own), a count under its minimum (``at_least``: option's
    dest -> minimum), so that no written figure rests on too few runs."""
    args = parser.parse_args(argv)
    if args.quick and args.write:
        parser.error("--quick figures are not for RESULTS.md")
    for name, minimum in (at_least or {}).items():
        if not args.quick and getattr(args, name) < minimum:
            parser.error(f"--{name.replace('_', '-')} must be at least {minimum}")
    return args


# -- the machine ---------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what platform says)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def machine() -> str:
    """Cores, CPU model, Python and load average (call it before the run)."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} cores, {cpu_model()}; "
        f"{platform.python_implementation()} {platform.python_version()}; "
        f"load average before the run {load}"
    )


def now() -> str:
    """The date and time in UTC, to the minute, for a section's ``Date:``."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


# -- target rows ---------------------------------------------------------------


def table_head(*cells: str) -> list[str]:
    """The two head lines of a markdown table of ``cells``: the first
    column text, the others figures (aligned right)."""
    return ["| " + " | ".join(cells) + " |", "|---|" + "---:|" * (len(cells) - 1)]


def target(
    figure: str, measured: str, goal: str, met: bool, limits: str = "", **more: Any
) -> dict:
    """One target row: what is measured, its figure, the goal, whether it is
    met and what limits it (when missed); ``more`` rides along."""
    return {
        "figure": figure,
        "measured": measured,
        "goal": goal,
        "met": met,
        "limits": limits,
        **more,
    }


def target_table(rows: list[dict], notes: Mapping[str, str] | None = None) -> str:
    """The markdown table of the target rows, then what limits the missed ones.

    Each row: ``figure``, ``measured``, ``goal``, ``met`` and ``limits``.
    The notes are one per missed row with limits, headed by its figure,
    unless ``notes`` (heading -> text) gives them otherwise (control.py
    gives one per kind of figure).
    """
    out = ["| target | measured | goal | met |", "|---|---:|---:|---|"]
    for row in rows:
        met = "yes" if row["met"] else "**no**"
        out.append(f"| {row['figure']} | {row['measured']} | {row['goal']} | {met} |")
    if notes is None:
        notes = {
            row["figure"]: row["limits"]
            for row in rows
            if not row["met"] and row.get("limits")
        }
    if notes:
        out += ["", "What limits the missed figures:", ""]
        out += [f"- **{heading}**: {text}" for heading, text in notes.items()]
    return "\n".join(out)


def write_targets(path: str | None, rows: list[dict]) -> None:
    """Hand the target rows to bench/run (``--targets-json PATH``).

    Each row: ``figure``, ``measured``, ``goal``, ``met`` and ``limits``
    (what limits a missed figure, or "").
    """
    if path:
        Path(path).write_text(json.dumps(rows, indent=1))


# -- RESULTS.md ----------------------------------------------------------------


def write_section(title: str, text: str, results: Path = RESULTS) -> None:
    """Replace the section headed ``title`` (``## ...``) of RESULTS.md, or add it.

    ``text`` starts with the heading line itself; a section runs to the
    next ``## `` heading (``### `` subsections belong to it).
    """
    old = results.read_text() if results.exists() else "# Benchmark results\n"
    start = old.find(title + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        following = old.find("\n## ", start + len(title))
        rest = "" if following < 0 else old[following + 1 :]
        new = old[:start] + text + ("\n" + rest if rest else "")
    results.write_text(new)


def section_text(title: str, host: str, command: str, body: str) -> str:
    """A ``##`` section: its heading, the machine, the date, the command, the body.

    ``command`` is the rest of the ``Command:`` paragraph, its closing
    full stop included.
    """
    return (
        f"{title}\n\n"
        f"Machine: {host}.  \n"
        f"Date: {now()}.  \n"
        f"Command: {command}\n\n"
        f"{body}\n"
    )


def finish(
    args: argparse.Namespace,
    host: str,
    text: str,
    rows: list[dict],
    sections: Iterable[tuple[str, str, str]],
) -> int:
    """Print the report, hand over the target rows, and with ``--write``
    replace each ``(title, command, body)`` section of RESULTS.md; 0."""
    print(f"Machine: {host}\n\n{text}")
    write_targets(args.targets_json, rows)
    if args.write:
        for title, command, body in sections:
            write_section(title, section_text(title, host, command, body))
        print(f"\nUpdated {RESULTS}")
    return 0
