"""Supervising N workers: start, stop and memory, busd against supervisord and circus.

Scenario 5, **start -> N ready, SIGTERM -> all gone** (N = 4 and 32):

- busd: ``busd run`` with one broker of N instances of ``bench_brokers:Noop``,
  ``NOTIFY_SOCKET`` pointing at a datagram socket of ours; the clock runs
  from the launch to busd's ``READY=1``, which busd sends once every
  instance is RUNNING (each worker has said "ready"). The workers are
  forked by busd's fork server (busd/forkserver.py), not started as an
  interpreter each as the peers' are: that is busd's design, measured;
- supervisord: ``numprocs = N`` of ``idle_worker.py`` (same interpreter),
  ``startsecs = 0``, until XML-RPC ``getAllProcessInfo`` shows N RUNNING;
- circus: ``circusd`` with ``numprocesses = N`` of the same worker, ipc://
  endpoints in a temp dir, until its client's ``status`` is ``active`` and
  ``list`` shows N PIDs.

Then SIGTERM to the supervisor, and the clock runs until it and every
worker PID it had are gone (zombies count as gone).

Scenario 6, **memory**: the supervisor's own RSS (psutil, by PID, not its
workers') once N = 1, 10, 100 workers are up and it has idled a second;
the growth per worker is the slope between N = 1 and N = 100.

The peers' parts need supervisor and circus: bench/run runs this script on
bench/.venv-peers' interpreter; busd always runs on the project's.

    bench/.venv-peers/bin/python bench/fleet.py [--quick] [--write]
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _procs
import psutil
from _procs import (
    BENCH,
    BUSD_PYTHON,
    PEERS,
    child_env,
    descendants,
    end_pids,
    measured,
    noop_broker,
    peer_version,
    quiet,
    supervisor_call,
    wait_until,
)
from _report import finish, options, parse, table_head, target, target_table
from _timing import find_hyperfine, hyperfine, rotated

START_SECTION = "## Start and stop N workers"
MEMORY_SECTION = "## Memory per supervised worker"
TARGET_START_MS = 150.0
TARGET_START_N = 4
TARGET_PER_WORKER = 100 * 1024
DEADLINE = 60.0
WORKER = [str(BUSD_PYTHON), str(BENCH / "idle_worker.py")]
KiB = 1024
MiB = 1024 * 1024
median = statistics.median


class Launched:
    """One supervisor process, how to tell it is ready, and its workers."""

    def __init__(self, process: subprocess.Popen, cleanup: Callable[[], None]):
        self.process = process
        self.cleanup = cleanup
        self.workers: list[int] = []


# -- busd ------------------------------------------------------------------------


def launch_busd(tmp: Path, n: int) -> tuple[Launched, Callable[[], bool]]:
    """busd with N Noop instances, telling its READY=1 on our NOTIFY_SOCKET."""
    notify_path = str(tmp / "notify.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(notify_path)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.setblocking(False)
    config = noop_broker(instances=n) if n else ""
    process, _sock = _procs.launch_busd(
        tmp, config, env=child_env(NOTIFY_SOCKET=notify_path)
    )

    def ready() -> bool:
        try:
            while True:
                if b"READY=1" in notify.recv(4096).split(b"\n"):
                    return True
        except BlockingIOError:
            return False

    return Launched(process, notify.close), ready


# -- supervisord -----------------------------------------------------------------


def launch_supervisord(tmp: Path, n: int) -> tuple[Launched, Callable[[], bool]]:
    """supervisord with N of the idle worker, ready when XML-RPC shows N RUNNING."""
    process, sock, _conf = _procs.launch_supervisord(
        tmp,
        "[program:w]\n"
        f"command={' '.join(WORKER)}\n"
        "process_name=%(program_name)s_%(process_num)03d\n"
        f"numprocs={n}\n"
        "startsecs=0\n"
        "autorestart=false\n"
        "stopwaitsecs=10\n",
    )

    def ready() -> bool:
        infos = supervisor_call(sock, "supervisor.getAllProcessInfo")
        return sum(info["statename"] == "RUNNING" for info in infos) >= n

    return Launched(process, lambda: None), ready


# -- circus ----------------------------------------------------------------------

CIRCUS_INI = """\
[circus]
endpoint = ipc://{tmp}/circus-endpoint
pubsub_endpoint = ipc://{tmp}/circus-pubsub
stats_endpoint = ipc://{tmp}/circus-stats
statsd = False
check_delay = 5
loglevel = WARNING
logoutput = {tmp}/circus.log

[watcher:w]
cmd = {worker}
numprocesses = {n}
warmup_delay = 0
copy_env = True
graceful_timeout = 10
"""


def launch_circus(tmp: Path, n: int) -> tuple[Launched, Callable[[], bool]]:
    """circusd with N of the idle worker, ready when its client's ``status``
    is active and ``list`` shows N PIDs."""
    from circus.client import CircusClient

    ini = tmp / "circus.ini"
    ini.write_text(CIRCUS_INI.format(tmp=tmp, worker=" ".join(WORKER), n=n))
    process = quiet([str(PEERS / "bin" / "circusd"), str(ini)], tmp)
    client = CircusClient(endpoint=f"ipc://{tmp}/circus-endpoint", timeout=0.5)

    def ready() -> bool:
        status = client.call({"command": "status", "properties": {"name": "w"}})
        if status.get("status") != "active":
            return False
        listed = client.call({"command": "list", "properties": {"name": "w"}})
        return len(listed.get("pids", [])) >= n

    return Launched(process, client.stop), ready


LAUNCHERS = {
    "busd": launch_busd,
    "supervisord": launch_supervisord,
    "circus": launch_circus,
}


# -- measuring -------------------------------------------------------------------


def gone(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie has)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def one_cycle(
    tool: str, n: int, tmp: Path, measure: Callable[[Launched], Any] | None = None
) -> dict[str, Any]:
    """Launch, wait until ready, optionally measure, SIGTERM, wait until all gone."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{tool}-", dir=tmp))
    start = time.perf_counter()
    launched, ready = LAUNCHERS[tool](run_dir, n)
    process = launched.process
    result: dict[str, Any] = {}
    try:
        # Polled every 2 ms: the figure is in tens of milliseconds.
        wait_until(ready, process, f"{tool} with {n} workers", DEADLINE, 0.002)
        result["start_ms"] = (time.perf_counter() - start) * 1000
        launched.workers = descendants(process.pid)
        if measure is not None:
            result["measure"] = measure(launched)
        pids = [process.pid, *launched.workers]
        stop_at = time.perf_counter()
        os.kill(process.pid, signal.SIGTERM)
        while not all(gone(pid) for pid in pids):
            if process.poll() is not None and time.perf_counter() - stop_at > DEADLINE:
                break
            if time.perf_counter() - stop_at > DEADLINE:
                raise RuntimeError(f"{tool}: still running {DEADLINE} s after SIGTERM")
            time.sleep(0.001)
        result["stop_ms"] = (time.perf_counter() - stop_at) * 1000
        return result
    finally:
        launched.cleanup()
        kids = [*launched.workers, *descendants(process.pid)]
        if process.poll() is None:
            process.kill()
        process.wait(10)
        end_pids([pid for pid in kids if not gone(pid)], grace=2)


def rss_after_idle(launched: Launched) -> dict[str, int]:
    """The supervisor's own memory, fds and threads after a second idle."""
    time.sleep(1.0)
    proc = psutil.Process(launched.process.pid)
    info = proc.memory_full_info()
    rollup = {}
    try:
        for line in Path(f"/proc/{proc.pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                rollup[key] = int(value.split()[0]) * KiB
    except OSError:
        pass
    return {
        "rss": info.rss,
        "uss": info.uss,
        "anon": rollup.get("Anonymous", 0),
        "fds": proc.num_fds(),
        "threads": proc.num_threads(),
    }


def run_cycles(
    tools: list[str],
    ns: list[int],
    repeats: int,
    tmp: Path,
    measure: Callable[[Launched], Any] | None = None,
) -> dict[str, dict[int, list[dict]]]:
    """``repeats`` rounds of one cycle per N and supervisor, taking turns:
    tool -> N -> the cycles' results."""
    out: dict[str, dict[int, list[dict]]] = {t: {n: [] for n in ns} for t in tools}
    for round_ in range(repeats):
        for n in ns:
            for tool in rotated(tools, round_):
                if n or tool == "busd":  # N = 0: busd's own start, for the notes
                    out[tool][n].append(one_cycle(tool, n, tmp, measure))
    return out


def hyperfine_imports() -> dict[str, float]:
    """Median ms of a bare interpreter, the fork server's imports, busd's CLI."""
    commands = {
        "python -c pass": f"{BUSD_PYTHON} -c pass",
        "python -c 'import busd.forkserver'": (
            f"{BUSD_PYTHON} -c 'import busd.forkserver'"
        ),
        "python -m busd run --help": f"{BUSD_PYTHON} -m busd run --help",
    }
    path = find_hyperfine("no start-up figures in the notes")
    if path is None:
        return {}
    try:
        times = hyperfine(path, commands, 3, 15, child_env())
    except RuntimeError:
        return {}
    return {name: median(seconds) * 1000 for name, seconds in times.items()}


# -- the report ----------------------------------------------------------------


def mid(cycles: list[dict], key: str) -> float:
    """The median of ``key`` over ``cycles``."""
    return median([c[key] for c in cycles])


def start_report(res: dict, tools: list[str], ns: list[int], imports: dict) -> tuple:
    """The start/stop table and target rows (with what limits a miss)."""
    lines = [
        "| N | supervisor | start → all ready, median ms | min-max | "
        "SIGTERM → all gone, median ms | min-max | start / busd |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for n in ns:
        busd_start = mid(res["busd"][n], "start_ms")
        for tool in tools:
            cycles = res[tool][n]
            starts = [c["start_ms"] for c in cycles]
            stops = [c["stop_ms"] for c in cycles]
            lines.append(
                f"| {n} | {tool} | {median(starts):.0f} | {min(starts):.0f}-"
                f"{max(starts):.0f} | {median(stops):.0f} | {min(stops):.0f}-"
                f"{max(stops):.0f} | {median(starts) / busd_start:.2f}x |"
            )
    rows = []
    if TARGET_START_N in res["busd"]:
        at = mid(res["busd"][TARGET_START_N], "start_ms")
        limits = ""
        if at > TARGET_START_MS:
            alone = res["busd"].get(0)
            zero = mid(alone, "start_ms") if alone else 0
            parts = []
            if zero:
                help_ms = imports.get("python -m busd run --help", 0.0)
                parts.append(
                    f"busd alone (no broker) reaches READY=1 in {zero:.0f} ms, of "
                    f"which its interpreter start and imports (`busd run --help`) "
                    f"are {help_ms:.0f} ms: the other {zero - help_ms:.0f} ms "
                    "import the daemon's modules (`--help` needs none of them: "
                    "asyncio, the config's dataclasses, tomllib) and run its "
                    "start listeners up to READY=1; the "
                    f"{TARGET_START_N} workers add {at - zero:.0f} ms"
                )
            if imports:
                server = imports["python -c 'import busd.forkserver'"]
                parts.append(
                    f"the fork server, which starts beside busd, needs {server:.0f} "
                    "ms to start and import busd.worker before it can fork the "
                    "first worker (a bare `python -c pass` "
                    f"{imports['python -c pass']:.0f} ms; hyperfine medians)"
                )
            parts.append(
                "what would meet it: less for busd to import and run before "
                "READY=1, since its own start is most of the figure"
            )
            limits = "; ".join(parts)
        rows.append(
            target(
                f"busd start → {TARGET_START_N} workers ready (READY=1)",
                f"{at:.0f} ms",
                f"≤ {TARGET_START_MS:.0f} ms",
                at <= TARGET_START_MS,
                limits,
            )
        )
        gone = mid(res["busd"][TARGET_START_N], "stop_ms")
        rows.append(
            target(
                f"busd SIGTERM → {TARGET_START_N} workers and busd gone",
                f"{gone:.0f} ms",
                f"≤ {TARGET_START_MS:.0f} ms",
                gone <= TARGET_START_MS,
                "each worker is asked to stop (a `stop` frame), "
                "finishes and exits; busd waits for every exit, then closes",
            )
        )
    return "\n".join(lines), rows


def memory_report(res: dict, tools: list[str], ns: list[int]) -> tuple:
    """The RSS table and the per-worker target row (``res``: the measures)."""
    lo, hi = min(ns), max(ns)
    lines = table_head(
        "supervisor",
        *(f"RSS N={n}" for n in ns),
        f"growth per worker (N={lo}→{hi})",
        "anon growth per worker",
        f"fds N={hi}",
    )
    slopes = {}
    for tool in tools:
        rss = {n: mid(res[tool][n], "rss") for n in ns}
        anon = {n: mid(res[tool][n], "anon") for n in ns}
        slope = (rss[hi] - rss[lo]) / (hi - lo)
        anon_slope = (anon[hi] - anon[lo]) / (hi - lo)
        slopes[tool] = slope
        fds = mid(res[tool][hi], "fds")
        lines.append(
            f"| {tool} | "
            + " | ".join(f"{rss[n] / MiB:.1f} MiB" for n in ns)
            + f" | {slope / KiB:.0f} KiB | {anon_slope / KiB:.0f} KiB | {fds:.0f} |"
        )
    slope = slopes["busd"]
    limits = ""
    if slope > TARGET_PER_WORKER:
        fds = mid(res["busd"][hi], "fds")
        limits = (
            f"busd holds {fds:.0f} fds at N={hi} (3 pipes per worker); per worker it "
            "keeps an asyncio subprocess transport with 3 pipe transports, 3 "
            "StreamReaders (64 KiB reads), 3 background tasks, an Instance and a "
            "log ring: measure with tracemalloc in busd to pin it down"
        )
    rows = [
        target(
            "busd RSS growth per supervised worker",
            f"{slope / KiB:.0f} KiB",
            f"≤ {TARGET_PER_WORKER // KiB} KiB",
            slope <= TARGET_PER_WORKER,
            limits,
        )
    ]
    return "\n".join(lines), rows


def run(
    tools: list[str], start_ns: list[int], memory_ns: list[int], repeats: int, tmp: Path
) -> tuple[dict, dict]:
    """The start/stop cycles, then the memory measures (tool -> N -> list)."""
    start = run_cycles(tools, start_ns, repeats, tmp)
    cycles = run_cycles(tools, memory_ns, repeats, tmp, rss_after_idle)
    memory = {
        tool: {n: [c["measure"] for c in by_n[n]] for n in by_n}
        for tool, by_n in cycles.items()
    }
    return start, memory


def main(argv: list[str] | None = None) -> int:
    """Run the cycles, print the tables; with ``--write`` update RESULTS.md."""
    parser = options(__doc__, quick="smoke test, busd only")
    parser.add_argument("--repeats", type=int, default=5)
    args = parse(parser, argv, at_least={"repeats": 5})
    if args.quick:
        tools, start_ns, memory_ns, repeats = ["busd"], [0, 2], [1, 3], 1
    else:
        tools, start_ns, memory_ns = list(LAUNCHERS), [0, 4, 32], [1, 10, 100]
        repeats = args.repeats
    host, (start, memory) = measured(
        lambda tmp: run(tools, start_ns, memory_ns, repeats, tmp)
    )
    for tool in tools[1:]:
        start[tool].pop(0, None)
    imports = hyperfine_imports() if not args.quick else {}
    start_text, start_rows = start_report(
        start, tools, [n for n in start_ns if n] or start_ns, imports
    )
    if 0 in start["busd"]:
        start_text += (
            "\n\nbusd with no broker at all: "
            f"{mid(start['busd'][0], 'start_ms'):.0f} ms to READY=1, "
            f"{mid(start['busd'][0], 'stop_ms'):.0f} ms to exit."
        )
    mem_text, mem_rows = memory_report(memory, tools, memory_ns)
    rows = start_rows + mem_rows
    command = (
        f"`bench/run` → `bench/fleet.py --write` ({repeats} "
        "repetitions, the supervisors taking turns, median; busd workers "
        "are `bench_brokers:Noop` instances (busd.worker, forked by busd's "
        "fork server; RUNNING once they said ready), "
        f"supervisord {peer_version('supervisor')} "
        f"and circus {peer_version('circus')} "
        "from bench/.venv-peers run `idle_worker.py` on the same "
        "interpreter (RUNNING / active once spawned, `startsecs = 0`))."
    )
    return finish(
        args,
        host,
        f"{target_table(rows)}\n\n{start_text}\n\n{mem_text}",
        rows,
        [
            (START_SECTION, command, f"{target_table(start_rows)}\n\n{start_text}"),
            (
                MEMORY_SECTION,
                command,
                f"{target_table(mem_rows)}\n\n"
                "Each supervisor's own RSS (psutil, by PID; its workers not "
                f"counted), 1 s after all N workers were up.\n\n{mem_text}",
            ),
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
