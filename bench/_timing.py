"""How the benchmarks take their figures: turns, samples, hyperfine, py-spy.

The things compared take turns (``rotated``) so that a slow patch of the
machine hits them alike; a round trip is one ``perf_counter_ns`` pair
around one call (``sample_us``); commands are timed by hyperfine; what
limits a missed figure is looked for with py-spy. Standard library only.
"""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from _procs import PEERS, quiet, stop_tree

T = TypeVar("T")


def rotated(items: Sequence[T], round_: int) -> list[T]:
    """``items`` shifted by ``round_``: no one of them always goes first."""
    shift = round_ % len(items)
    return [*items[shift:], *items[:shift]]


def percentile(samples: list[float], fraction: float) -> float:
    """The sample at ``fraction`` (0.99: p99) of the sorted samples."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def sample_us(call: Callable[[], object], count: int, out: list[float]) -> None:
    """Call ``call`` ``count`` times, one at a time; append each call's
    microseconds to ``out``."""
    clock = time.perf_counter_ns
    for _ in range(count):
        start = clock()
        call()
        out.append((clock() - start) / 1000)


# -- hyperfine -----------------------------------------------------------------


def find_hyperfine(instead: str) -> str | None:
    """hyperfine's path if it is there and has ``-N`` (1.13 or later); else
    None, saying on stderr that the caller does ``instead``."""
    path = shutil.which("hyperfine")
    if path is None:
        print(f"hyperfine not found: {instead}", file=sys.stderr)
        return None
    version = subprocess.run([path, "--version"], capture_output=True, text=True)
    numbers = version.stdout.split()[-1].split(".") if version.stdout else []
    if tuple(int(n) for n in numbers[:2] if n.isdigit()) < (1, 13):
        print(f"{version.stdout.strip()} lacks -N: {instead}", file=sys.stderr)
        return None
    return path


def hyperfine(
    path: str,
    commands: Mapping[str, str],
    warmup: int,
    runs: int,
    env: dict[str, str],
) -> dict[str, list[float]]:
    """Seconds of each run of each command (name -> command line), timed by
    hyperfine ``-N`` (no shell) in the order given, after ``warmup`` runs."""
    with tempfile.TemporaryDirectory() as tmp:
        export = Path(tmp) / "hyperfine.json"
        argv = [path, "-N", "--style", "none", "--export-json", str(export)]
        argv += ["--warmup", str(warmup), "--runs", str(runs)]
        for name, command in commands.items():
            argv += ["-n", name, command]
        done = subprocess.run(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        if done.returncode:
            sys.stderr.buffer.write(done.stderr)
            raise RuntimeError(f"hyperfine failed with status {done.returncode}")
        results = json.loads(export.read_text())["results"]
    # With -n, hyperfine's "command" is the name given.
    return {result["command"]: result["times"] for result in results}


# -- py-spy --------------------------------------------------------------------


def spy_io_thread(
    pid: int,
    output: Path,
    seconds: int,
    rate: int,
    load: Callable[[], object],
    in_thread: Callable[[list[str]], bool],
    idle: Collection[str],
    nonblocking: bool = False,
    settle: float = 0.0,
) -> dict:
    """Record ``pid`` with py-spy (bench/.venv-peers) for ``seconds`` at
    ``rate`` Hz, ``load()`` running again and again meanwhile (after
    ``settle`` s), raw output to ``output``; sum up one thread's samples.

    The thread's stacks are those ``in_thread`` picks (it gets their
    frames, outermost first, each ``function (file:line)``). Returns the
    samples in all (``total``), those idle (innermost frame in ``idle``:
    waiting, not working), and for the busy ones the samples per
    innermost frame (``leaves``) and per innermost busd frame (``own``).
    """
    argv = [str(PEERS / "bin" / "py-spy"), "record", "--pid", str(pid)]
    argv += ["--duration", str(seconds), "--rate", str(rate), "--format", "raw"]
    argv += ["--output", str(output)]
    if nonblocking:
        argv.append("--nonblocking")
    spy = quiet(argv)
    try:
        if settle:
            time.sleep(settle)
        deadline = time.monotonic() + seconds + 10
        while spy.poll() is None and time.monotonic() < deadline:
            load()
        spy.wait(20)
    finally:
        stop_tree(spy)
    leaves: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    total = waiting = 0
    for line in output.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [frame for frame in stack.split(";") if frame]
        if not count.isdigit() or not in_thread(frames):
            continue
        n = int(count)
        total += n
        leaf = frame_name(frames[-1])
        if leaf in idle:
            waiting += n
            continue
        leaves[leaf] += n
        busd_frames = [frame for frame in frames if "busd/" in frame]
        if busd_frames:
            own[frame_name(busd_frames[-1])] += n
    return {"total": total, "idle": waiting, "leaves": leaves, "own": own}


def frame_name(frame: str) -> str:
    """A py-spy frame's function, without its ``(file:line)``."""
    return frame.split(" (")[0]


def shares(counts: collections.Counter, total: int, most: int) -> str:
    """The ``most`` commonest of ``counts`` as "`name` 12%, ...", of ``total``."""
    return ", ".join(
        f"`{name}` {count / total:.0%}" for name, count in counts.most_common(most)
    )
