"""Helpers shared by the benchmarks: the machine line and RESULTS.md sections."""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def cpu_model() -> str:
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
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


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
