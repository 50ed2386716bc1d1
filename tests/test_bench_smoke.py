"""Smoke test of bench/control.py: ``--quick`` runs and prints its table.

Quick mode starts busd and the echo server, times busctl against the floor
client and the round trips with tiny counts, and skips supervisord (no
peer virtualenv is created). Only the exit status and the table are
checked: the figures themselves are never asserted.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_control_bench_quick_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "control.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "| target | measured | goal | met |" in done.stdout
    assert "busctl ping" in done.stdout
    assert "supervisord" not in done.stdout


def test_bench_run_quick_runs() -> None:
    """``bench/run --quick``: every benchmark once, tiny, no peers, nothing left."""
    done = subprocess.run(
        [str(ROOT / "bench" / "run"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "## Summary" in done.stdout
    assert "| step | target | measured | goal | met |" in done.stdout
    for step in ("control plane", "throughput", "start/stop + memory", "idle clients"):
        assert f"| {step} |" in done.stdout
    assert "no benchmark process left running" in done.stderr
