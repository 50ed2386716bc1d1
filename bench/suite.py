"""bench/run: every benchmark, busd against its peers, in one run.

Sets up bench/.venv-peers (supervisor, circus, CherryPy, redis-py, py-spy,
psutil from PyPI) and redis-server/redis-benchmark (Debian, ``apt-get``),
then runs, each on its own:

1. ``bus_publish.py``: ``Bus.publish`` and subscribe + unsubscribe against
   CherryPy's (in-process);
2. ``control.py``: CLI wall time, control round trip, busd's idle RSS,
   against supervisord;
3. ``throughput.py``: publish -> ack through busd against Redis PUBLISH;
4. ``fleet.py``: start/stop N workers and memory per worker, against
   supervisord and circus (on the peers' interpreter);
5. ``scaling.py``: round trip with 0/100/1000 idle clients.

Each hands its target rows back (``--targets-json``). With ``--write``
each updates its section of RESULTS.md and this script puts a
``## Summary`` at the top: every target, met or not, and what
limits each missed one. At the end it checks with psutil that no process
a benchmark started is left, and ends any by PID.

``--quick`` is the smoke test: one repetition, small N, no peers, nothing
installed or written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from _procs import (
    BENCH,
    PEER_PACKAGES,
    PEERS,
    ROOT,
    TMP_PREFIX,
    ensure_peers,
    redis_available,
)
from _report import machine, options, parse, section_text, write_section

DEBIAN_PACKAGES = ("redis-server", "redis-tools")
SUMMARY = "## Summary"
# What a benchmark's processes carry in their command line or cwd.
MARKS = (TMP_PREFIX, "idle_worker.py", "bench_brokers", "echo_server.py")


def log(text: str) -> None:
    """A progress line on stderr, marked as bench/run's."""
    print(f"[bench/run] {text}", file=sys.stderr, flush=True)


# -- setting up the peers --------------------------------------------------------


def ensure_redis() -> str:
    """Install redis-server and redis-tools from Debian if missing (as root)."""
    if redis_available():
        return "redis-server and redis-benchmark present"
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return "redis skipped: no apt-get, or not root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", *DEBIAN_PACKAGES]
    log(" ".join(command))
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not shutil.which("redis-server"):
        return "redis skipped: `apt-get install redis-server redis-tools` failed"
    # A package's postinst may start the system's redis (not where
    # policy-rc.d forbids it): end it, we start our own.
    for proc in psutil.process_iter(["name", "create_time"]):
        if proc.info["name"] == "redis-server" and proc.info["create_time"] > START:
            log(f"ending redis-server PID {proc.pid} started by the package")
            proc.terminate()
    return "redis-server and redis-tools installed from Debian"


# -- the steps ---------------------------------------------------------------------


def run_script(
    name: str, args: argparse.Namespace, python: str | None = None, cwd: Path = BENCH
) -> list[dict]:
    """Run one benchmark script on its own; the target rows it hands back."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        targets = handle.name
    command = [python or sys.executable, str(BENCH / name)]
    if args.quick:
        command.append("--quick")
    elif args.write:
        command.append("--write")
    command += ["--targets-json", targets]
    try:
        subprocess.run(command, cwd=cwd, check=True)
        text = Path(targets).read_text()
        return json.loads(text) if text.strip() else []
    finally:
        os.unlink(targets)


def peers_python() -> str:
    """The peers' interpreter if it has what fleet.py imports, else ours."""
    python = PEERS / "bin" / "python"
    probe = subprocess.run(
        [str(python), "-c", "import circus, psutil, supervisor"], capture_output=True
    )
    return str(python) if probe.returncode == 0 else sys.executable


# -- leftovers -------------------------------------------------------------------


#: Set in this run's environment; every process the run starts inherits it,
#: so the sweep ends this run's leftovers and never another run's (tests or
#: benchmarks of other checkouts on the same machine carry the same marks).
RUN_VARIABLE = "BUSD_BENCH_RUN"


def leftovers(before: set[int]) -> list[psutil.Process]:
    """Processes of this run, started since ``before``, with a benchmark's marks."""
    token = os.environ.get(RUN_VARIABLE)
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd", "name"]):
        if proc.pid in before or proc.pid == os.getpid():
            continue
        text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["cwd"] or "")
        if not any(mark in text for mark in MARKS):
            continue
        try:
            ours = proc.environ().get(RUN_VARIABLE) == token
        except psutil.Error:
            ours = False  # gone, or not ours to read
        if ours:
            found.append(proc)
    return found


# -- the summary -----------------------------------------------------------------


def summary(
    host: str,
    steps: dict[str, tuple[float, list[dict]]],
    notes: list[str],
    command: str,
) -> str:
    """The ``## Summary`` section: every target of every step, then what
    limits each missed one."""
    total = sum(seconds for seconds, _rows in steps.values())
    rows = [(step, row) for step, (_s, rs) in steps.items() for row in rs]
    missed = [(step, row) for step, row in rows if not row["met"]]
    out = [
        f"**{len(missed)} of {len(rows)} targets missed.**",
        "",
        "| step | target | measured | goal | met |",
        "|---|---|---:|---:|---|",
    ]
    for step, row in rows:
        met = "yes" if row["met"] else "**no**"
        out.append(
            f"| {step} | {row['figure']} | {row['measured']} | {row['goal']} | {met} |"
        )
    if missed:
        out += ["", "### What limits each missed figure", ""]
        for step, row in missed:
            limits = row["limits"] or "see the section below"
            out.append(
                f"- **{row['figure']}** ({row['measured']}, goal {row['goal']}; "
                f"{step}): {limits}."
            )
    how = (
        f"`{command}`, {total / 60:.1f} min in all ("
        + ", ".join(f"{step} {s:.0f} s" for step, (s, _r) in steps.items())
        + ").  \nSet-up: "
        + "; ".join(notes)
        + "."
    )
    return section_text(SUMMARY, host, how, "\n".join(out))


def write_summary(text: str) -> None:
    """Replace the ``## Summary`` of RESULTS.md, or put it at the top."""
    results = BENCH / "RESULTS.md"
    old = results.read_text() if results.exists() else "# Benchmark results\n"
    if SUMMARY + "\n" in old:
        write_section(SUMMARY, text, results)
        return
    head, _, rest = old.partition("\n")
    results.write_text(head + "\n\n" + text + "\n" + rest.lstrip("\n"))


START = time.time()


def main(argv: list[str] | None = None) -> int:
    """Set up the peers, run every benchmark, then the summary and the sweep."""
    parser = options(__doc__, targets=False)
    args = parse(parser, argv)
    before = set(psutil.pids())
    os.environ[RUN_VARIABLE] = f"{os.getpid()}-{time.time_ns()}"
    notes = []
    if not args.quick:
        ensure_peers()
        notes.append("peers venv: " + ", ".join(PEER_PACKAGES))
        notes.append(ensure_redis())
    else:
        notes.append("--quick: no peers")
    host = machine()
    fleet_python = sys.executable if args.quick else peers_python()
    plan = [
        ("Bus.publish", lambda: run_script("bus_publish.py", args)),
        # control.py runs in the root, as it always has: its commands start
        # there (`python -m busctl` under --quick, the `python -c` of its
        # notes), which puts the root first on their sys.path.
        ("control plane", lambda: run_script("control.py", args, cwd=ROOT)),
        ("throughput", lambda: run_script("throughput.py", args)),
        ("start/stop + memory", lambda: run_script("fleet.py", args, fleet_python)),
        ("idle clients", lambda: run_script("scaling.py", args)),
    ]
    steps: dict[str, tuple[float, list[dict]]] = {}
    status = 0
    try:
        for name, step in plan:
            log(f"{name} ...")
            start = time.perf_counter()
            rows = step()
            steps[name] = (time.perf_counter() - start, rows)
            log(f"{name}: {steps[name][0]:.1f} s")
    finally:
        left = leftovers(before)
        for proc in left:
            log(f"left running: PID {proc.pid} {proc.info['cmdline']}; ending it")
            status = 1
        _gone, alive = psutil.wait_procs(
            [p for p in left if not p.terminate()], timeout=5
        )
        for proc in alive:
            proc.kill()
    command = "bench/run" + (" --quick" if args.quick else "")
    command += " --write" if args.write else ""
    text = summary(host, steps, notes, command)
    print("\n" + text)
    if args.write:
        write_summary(text)
        log(f"updated {BENCH / 'RESULTS.md'}")
    if status == 0:
        log("no benchmark process left running")
    return status


if __name__ == "__main__":
    sys.exit(main())
