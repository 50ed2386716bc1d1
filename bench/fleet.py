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

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from _common import (
    BENCH,
    BUSD_PYTHON,
    child_env,
    end_pids,
    machine,
    now,
    target_table,
    write_section,
    write_targets,
)

START_SECTION = "## Start and stop N workers"
MEMORY_SECTION = "## Memory per supervised worker"
TARGET_START_MS = 150.0
TARGET_START_N = 4
TARGET_PER_WORKER = 100 * 1024
DEADLINE = 60.0
WORKER = [str(BUSD_PYTHON), str(BENCH / "idle_worker.py")]
KiB = 1024
MiB = 1024 * 1024


class Launched:
    """One supervisor process, how to tell it is ready, and its workers."""

    def __init__(self, process: subprocess.Popen, cleanup: Callable[[], None]):
        self.process = process
        self.cleanup = cleanup
        self.workers: list[int] = []


# -- busd ------------------------------------------------------------------------


def launch_busd(tmp: Path, n: int) -> tuple[Launched, Callable[[], bool]]:
    config = tmp / "busd.toml"
    config.write_text(
        ""
        if n == 0
        else (
            "[brokers.bench]\n"
            'handler = "bench_brokers:Noop"\n'
            f'cwd = "{BENCH}"\n'
            f"instances = {n}\n"
        )
    )
    notify_path = str(tmp / "notify.sock")
    with_suppress_unlink(notify_path)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.setblocking(False)
    log = open(tmp / "busd.log", "ab")  # noqa: SIM115 - closed by cleanup
    process = subprocess.Popen(
        [
            *(str(BUSD_PYTHON), "-m", "busd", "run", "--config", str(config)),
            *("--socket", str(tmp / "busd.sock"), "--pidfile", str(tmp / "busd.pid")),
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        env=child_env(NOTIFY_SOCKET=notify_path),
        cwd=tmp,
    )

    def cleanup() -> None:
        notify.close()
        log.close()

    def ready() -> bool:
        try:
            while True:
                if b"READY=1" in notify.recv(4096).split(b"\n"):
                    return True
        except BlockingIOError:
            return False

    return Launched(process, cleanup), ready


def with_suppress_unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# -- supervisord -----------------------------------------------------------------

SUPERVISORD_CONF = """\
[unix_http_server]
file={tmp}/supervisor.sock

[supervisord]
nodaemon=true
pidfile={tmp}/supervisord.pid
logfile={tmp}/supervisord.log
childlogdir={tmp}
loglevel=warn

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[program:w]
command={worker}
process_name=%(program_name)s_%(process_num)03d
numprocs={n}
startsecs=0
autorestart=false
stopwaitsecs=10
"""


class UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def make_connection(self, host: Any) -> Any:
        import http.client

        class Connection(http.client.HTTPConnection):
            def connect(conn) -> None:
                conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.sock.connect(self.path)

        return Connection("localhost")


def launch_supervisord(tmp: Path, n: int) -> tuple[Launched, Callable[[], bool]]:
    from _common import PEERS

    conf = tmp / "supervisord.conf"
    conf.write_text(SUPERVISORD_CONF.format(tmp=tmp, worker=" ".join(WORKER), n=n))
    sock = str(tmp / "supervisor.sock")
    with_suppress_unlink(sock)
    process = subprocess.Popen(
        [str(PEERS / "bin" / "supervisord"), "-c", str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp,
    )
    proxy = xmlrpc.client.ServerProxy("http://localhost", transport=UnixTransport(sock))

    def ready() -> bool:
        try:
            infos = proxy.supervisor.getAllProcessInfo()
        except (OSError, xmlrpc.client.Error):
            return False
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
    from _common import PEERS
    from circus.client import CircusClient

    ini = tmp / "circus.ini"
    ini.write_text(CIRCUS_INI.format(tmp=tmp, worker=" ".join(WORKER), n=n))
    process = subprocess.Popen(
        [str(PEERS / "bin" / "circusd"), str(ini)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp,
    )
    client = CircusClient(endpoint=f"ipc://{tmp}/circus-endpoint", timeout=0.5)

    def ready() -> bool:
        try:
            status = client.call({"command": "status", "properties": {"name": "w"}})
            if status.get("status") != "active":
                return False
            listed = client.call({"command": "list", "properties": {"name": "w"}})
        except Exception:
            return False
        return len(listed.get("pids", [])) >= n

    return Launched(process, client.stop), ready


LAUNCHERS = {
    "busd": launch_busd,
    "supervisord": launch_supervisord,
    "circus": launch_circus,
}


# -- measuring -------------------------------------------------------------------


def gone(pid: int) -> bool:
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
        while not ready():
            if process.poll() is not None:
                raise RuntimeError(f"{tool} exited with {process.returncode}")
            if time.perf_counter() - start > DEADLINE:
                raise RuntimeError(f"{tool}: {n} workers not ready in {DEADLINE} s")
            time.sleep(0.002)
        result["start_ms"] = (time.perf_counter() - start) * 1000
        launched.workers = [
            p.pid for p in psutil.Process(process.pid).children(recursive=True)
        ]
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
        kids = [*launched.workers]
        with contextlib.suppress(psutil.Error):
            kids += [p.pid for p in psutil.Process(process.pid).children(True)]
        if process.poll() is None:
            process.kill()
        process.wait(10)
        end_pids([pid for pid in kids if not gone(pid)], grace=2)


def rss_after_idle(launched: Launched) -> dict[str, int]:
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


def rotate(items: list[str], round_: int) -> list[str]:
    shift = round_ % len(items)
    return items[shift:] + items[:shift]


def run_start(tools: list[str], ns: list[int], repeats: int, tmp: Path) -> dict:
    out: dict[str, dict[int, list[dict]]] = {t: {n: [] for n in ns} for t in tools}
    for round_ in range(repeats):
        for n in ns:
            for tool in rotate(tools, round_):
                if n or tool == "busd":  # N = 0: busd's own start, for the notes
                    out[tool][n].append(one_cycle(tool, n, tmp))
    return out


def run_memory(tools: list[str], ns: list[int], repeats: int, tmp: Path) -> dict:
    out: dict[str, dict[int, list[dict]]] = {t: {n: [] for n in ns} for t in tools}
    for round_ in range(repeats):
        for n in ns:
            for tool in rotate(tools, round_):
                cycle = one_cycle(tool, n, tmp, rss_after_idle)
                out[tool][n].append(cycle["measure"])
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
    with tempfile.NamedTemporaryFile(suffix=".json") as export:
        done = subprocess.run(
            [
                *("hyperfine", "-N", "--warmup", "3", "--runs", "15"),
                *("--style", "none"),
                *("--export-json", export.name, *commands.values()),
            ],
            env=child_env(),
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            return {}
        data = json.loads(Path(export.name).read_text())
    return {
        name: statistics.median(r["times"]) * 1000
        for name, r in zip(commands, data["results"], strict=True)
    }


# -- the report ----------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values)


def start_report(res: dict, tools: list[str], ns: list[int], imports: dict) -> tuple:
    lines = [
        "| N | supervisor | start → all ready, median ms | min-max | "
        "SIGTERM → all gone, median ms | min-max | start / busd |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for n in ns:
        busd_start = med([c["start_ms"] for c in res["busd"][n]])
        for tool in tools:
            cycles = res[tool][n]
            starts = [c["start_ms"] for c in cycles]
            stops = [c["stop_ms"] for c in cycles]
            lines.append(
                f"| {n} | {tool} | {med(starts):.0f} | {min(starts):.0f}-"
                f"{max(starts):.0f} | {med(stops):.0f} | {min(stops):.0f}-"
                f"{max(stops):.0f} | {med(starts) / busd_start:.2f}x |"
            )
    rows = []
    if TARGET_START_N in res["busd"]:
        at = med([c["start_ms"] for c in res["busd"][TARGET_START_N]])
        limits = ""
        if at > TARGET_START_MS:
            zero = med([c["start_ms"] for c in res["busd"].get(0, [])] or [0])
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
            {
                "figure": f"busd start → {TARGET_START_N} workers ready (READY=1)",
                "measured": f"{at:.0f} ms",
                "goal": f"≤ {TARGET_START_MS:.0f} ms",
                "met": at <= TARGET_START_MS,
                "limits": limits,
            }
        )
        gone = med([c["stop_ms"] for c in res["busd"][TARGET_START_N]])
        rows.append(
            {
                "figure": f"busd SIGTERM → {TARGET_START_N} workers and busd gone",
                "measured": f"{gone:.0f} ms",
                "goal": f"≤ {TARGET_START_MS:.0f} ms",
                "met": gone <= TARGET_START_MS,
                "limits": "each worker is asked to stop (a `stop` frame), "
                "finishes and exits; busd waits for every exit, then closes",
            }
        )
    return "\n".join(lines), rows


def memory_report(res: dict, tools: list[str], ns: list[int]) -> tuple:
    lo, hi = min(ns), max(ns)
    lines = [
        "| supervisor | "
        + " | ".join(f"RSS N={n}" for n in ns)
        + f" | growth per worker (N={lo}→{hi}) | anon growth per worker | fds N={hi} |",
        "|---|" + "---:|" * (len(ns) + 3),
    ]
    slopes = {}
    for tool in tools:
        rss = {n: med([m["rss"] for m in res[tool][n]]) for n in ns}
        anon = {n: med([m["anon"] for m in res[tool][n]]) for n in ns}
        slope = (rss[hi] - rss[lo]) / (hi - lo)
        anon_slope = (anon[hi] - anon[lo]) / (hi - lo)
        slopes[tool] = slope
        fds = med([m["fds"] for m in res[tool][hi]])
        lines.append(
            f"| {tool} | "
            + " | ".join(f"{rss[n] / MiB:.1f} MiB" for n in ns)
            + f" | {slope / KiB:.0f} KiB | {anon_slope / KiB:.0f} KiB | {fds:.0f} |"
        )
    slope = slopes["busd"]
    limits = ""
    if slope > TARGET_PER_WORKER:
        fds = med([m["fds"] for m in res["busd"][hi]])
        limits = (
            f"busd holds {fds:.0f} fds at N={hi} (3 pipes per worker); per worker it "
            "keeps an asyncio subprocess transport with 3 pipe transports, 3 "
            "StreamReaders (64 KiB reads), 3 background tasks, an Instance and a "
            "log ring: measure with tracemalloc in busd to pin it down"
        )
    rows = [
        {
            "figure": "busd RSS growth per supervised worker",
            "measured": f"{slope / KiB:.0f} KiB",
            "goal": f"≤ {TARGET_PER_WORKER // KiB} KiB",
            "met": slope <= TARGET_PER_WORKER,
            "limits": limits,
        }
    ]
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test, busd only")
    parser.add_argument("--write", action="store_true", help="update RESULTS.md")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--targets-json", help="write the target rows here")
    args = parser.parse_args(argv)
    if args.quick:
        tools, start_ns, memory_ns, repeats = ["busd"], [0, 2], [1, 3], 1
    else:
        if args.repeats < 5:
            parser.error("--repeats must be at least 5")
        tools, start_ns, memory_ns = list(LAUNCHERS), [0, 4, 32], [1, 10, 100]
        repeats = args.repeats
    host = machine()
    with tempfile.TemporaryDirectory(prefix="busd-bench-") as tmp:
        start = run_start(tools, start_ns, repeats, Path(tmp))
        memory = run_memory(tools, memory_ns, repeats, Path(tmp))
    for tool in tools[1:]:
        start[tool].pop(0, None)
    imports = hyperfine_imports() if not args.quick else {}
    start_text, start_rows = start_report(
        start, tools, [n for n in start_ns if n] or start_ns, imports
    )
    if 0 in start["busd"]:
        zero = [c["start_ms"] for c in start["busd"][0]]
        start_text += (
            f"\n\nbusd with no broker at all: {med(zero):.0f} ms to READY=1, "
            f"{med([c['stop_ms'] for c in start['busd'][0]]):.0f} ms to exit."
        )
    mem_text, mem_rows = memory_report(memory, tools, memory_ns)
    rows = start_rows + mem_rows
    print(f"Machine: {host}\n\n{target_table(rows)}\n\n{start_text}\n\n{mem_text}")
    write_targets(args.targets_json, rows)
    if args.write:
        common = (
            f"Machine: {host}.  \nDate: {now()}.  \n"
            f"Command: `bench/run` → `bench/fleet.py --write` ({repeats} "
            "repetitions, the supervisors taking turns, median; busd workers "
            "are `bench_brokers:Noop` instances (busd.worker, forked by busd's "
            "fork server; RUNNING once they said ready), supervisord 4.3.0 "
            "and circus 0.19.0 "
            "from bench/.venv-peers run `idle_worker.py` on the same "
            "interpreter (RUNNING / active once spawned, `startsecs = 0`)).\n\n"
        )
        write_section(
            START_SECTION,
            f"{START_SECTION}\n\n{common}{target_table(start_rows)}\n\n{start_text}\n",
        )
        write_section(
            MEMORY_SECTION,
            f"{MEMORY_SECTION}\n\n{common}{target_table(mem_rows)}\n\n"
            f"Each supervisor's own RSS (psutil, by PID; its workers not "
            f"counted), 1 s after all N workers were up.\n\n{mem_text}\n",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
