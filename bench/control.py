"""How fast and small is busd's control plane? busd against its floors and supervisord.

Three figures, each measured side by side in one run, the things compared
taking turns so that a slow patch of the machine hits them alike:

1. CLI wall time (hyperfine, else subprocess + perf_counter): ``busctl
   ping`` and ``busctl state`` against ``bench/floor_client.py`` (Python +
   msgpack + one framed ping on the same socket) and ``supervisorctl
   status`` against a real supervisord.
2. Round trip on one connection: ``busctl.Client.ping()`` and a raw framed
   socket client, each against busd and against ``bench/echo_server.py``
   (a bare asyncio msgpack server); supervisord's XML-RPC
   ``supervisor.getState`` over its Unix socket with a keep-alive HTTP
   connection (what ``supervisor.xmlrpc.SupervisorTransport`` does).
3. Idle memory: RSS (and USS) of busd and supervisord by PID, after start
   and after the benchmark.

busd is measured as users get it: each run builds a wheel of the working
tree and installs it (``--no-deps``, with the runtime dependencies from
pyproject.toml) into ``bench/.venv-busd``, whose ``busd``, ``busctl`` and
``python`` run busd, the CLI, the floor client and the echo server. The
working tree's editable install in ``.venv`` would add an import hook to
every interpreter start (``__editable___busd_..._finder``) that a normal
install does not have. supervisor (and py-spy, for the notes) are
installed into ``bench/.venv-peers``, created on first use.

Run from the repository root::

    .venv/bin/python bench/control.py            # print the tables
    .venv/bin/python bench/control.py --write    # and update RESULTS.md
    .venv/bin/python bench/control.py --quick    # smoke test: busd vs floors only

``--quick`` runs busd and busctl from the working tree instead (no wheel,
no package index needed): its figures are not the users'.
"""

from __future__ import annotations

import collections
import gc
import itertools
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import psutil
from _procs import (
    BENCH,
    PEERS,
    ROOT,
    SHIPPED_PYTHON,
    SupervisorRPC,
    closing_all,
    ending,
    ensure_peers,
    install_busd,
    measured,
    peer_version,
    python_env,
    start_busd,
    start_echo,
    start_supervisord,
    stdout_of,
)
from _report import finish, options, parse, table_head, target, target_table
from _timing import (
    find_hyperfine,
    frame_name,
    hyperfine,
    percentile,
    rotated,
    sample_us,
    shares,
    spy_io_thread,
)

from busctl import Client

SECTION = "## Control plane"
MiB = 1024 * 1024
STARTUP_DEADLINE = 20.0

# Targets from the issue: (what, goal text).
CLI_FLOOR_RATIO = 1.3  # busctl wall time <= 1.3x the floor client
CLI_PEER_RATIO = 3.0  # supervisorctl status >= 3x busctl's wall time
RTT_FLOOR_RATIO = 1.5  # busd p50 <= 1.5x the echo server's
RTT_PEER_RATIO = 3.0  # supervisord getState p50 >= 3x busd's ping
RSS_LIMIT = 20 * MiB


@dataclass
class Settings:
    """How many runs, rounds and calls; ``--quick`` makes them tiny."""

    quick: bool
    cli_rounds: int
    cli_runs: int  # per round
    cli_warmup: int
    calls: int  # round trips per client/server pair
    rtt_rounds: int
    peers: bool

    @classmethod
    def make(cls, quick: bool, calls: int, runs: int) -> Settings:
        """The settings for ``--quick`` or a full run of ``runs`` CLI runs."""
        if quick:
            return cls(True, 1, 3, 1, 200, 1, False)
        rounds = 4
        return cls(False, rounds, -(-runs // rounds), 3, calls, 10, True)


# -- processes -----------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """Where busd, busctl, the floor client and the echo server run from."""

    python: str
    busd: list[str]
    busctl: list[str]
    env: dict[str, str]


def installed(tmp: Path) -> Runtime:
    """busd as users get it: a wheel of the working tree in bench/.venv-busd."""
    install_busd(tmp)
    bin_ = SHIPPED_PYTHON.parent
    return Runtime(
        str(SHIPPED_PYTHON),
        [str(bin_ / "busd")],
        [str(bin_ / "busctl")],
        python_env(),
    )


def working_tree() -> Runtime:
    """busd from the working tree, without installing (--quick: no index needed)."""
    python = sys.executable
    return Runtime(
        python,
        [python, "-m", "busd"],
        [python, "-m", "busctl"],
        python_env(str(ROOT)),
    )


# -- clients -------------------------------------------------------------------


class RawClient:
    """Framed request, framed answer, nothing else: the like-for-like client."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.ids = 0

    def ping(self) -> Any:
        """One framed ping; its result."""
        self.ids += 1
        body = msgpack.packb({"id": self.ids, "op": "ping"}, use_bin_type=True)
        self.sock.sendall(struct.pack(">I", len(body)) + body)
        data = self.sock.recv(65536)
        while len(data) < 4 or len(data) < 4 + struct.unpack_from(">I", data)[0]:
            data += self.sock.recv(65536)
        return msgpack.unpackb(data[4:], raw=False)["result"]

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


# -- 1. CLI wall time ----------------------------------------------------------


def cli_commands(
    rt: Runtime, busd_sock: str, supervisor_conf: Path | None
) -> dict[str, list[str]]:
    """The commands whose wall time is compared, by name."""
    # The console script pip wrote, as users run it; the floor on the same
    # interpreter, so that both start alike.
    busctl_cmd = rt.busctl
    commands = {
        "floor client": [rt.python, str(BENCH / "floor_client.py"), busd_sock],
        "busctl ping": [*busctl_cmd, "--socket", busd_sock, "ping"],
        "busctl state": [*busctl_cmd, "--socket", busd_sock, "state"],
    }
    if supervisor_conf is not None:
        commands["supervisorctl status"] = [
            str(PEERS / "bin" / "supervisorctl"),
            "-c",
            str(supervisor_conf),
            "status",
        ]
    return commands


def time_cli(
    commands: dict[str, list[str]], settings: Settings, env: dict[str, str]
) -> tuple[dict[str, list[float]], str]:
    """Wall seconds per run of each command, rounds interleaved; and the tool."""
    names = list(commands)
    times: dict[str, list[float]] = {name: [] for name in names}
    path = find_hyperfine("timing with subprocess")
    for round_ in range(settings.cli_rounds):
        order = rotated(names, round_)
        if path:
            lines = {name: " ".join(commands[name]) for name in order}
            timed = hyperfine(path, lines, settings.cli_warmup, settings.cli_runs, env)
            for name, seconds in timed.items():
                times[name] += seconds
        else:
            for name in order:
                for _ in range(settings.cli_warmup):
                    run_once(commands[name], env)
            for _ in range(settings.cli_runs):
                for name in order:
                    times[name].append(run_once(commands[name], env))
    tool = "hyperfine" if path else "subprocess + perf_counter"
    return times, tool


def run_once(argv: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one run of ``argv`` (no hyperfine)."""
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


# -- 2. round trip -------------------------------------------------------------


def time_round_trips(
    clients: dict[str, Any], settings: Settings
) -> dict[str, list[float]]:
    """Microseconds per call for each client, in interleaved chunks."""
    names = list(clients)
    for client in clients.values():  # warm up connections and code paths
        for _ in range(min(200, settings.calls)):
            client.ping()
    samples: dict[str, list[float]] = {name: [] for name in names}
    chunk = max(1, settings.calls // settings.rtt_rounds)
    gc.disable()
    try:
        for round_ in range(settings.rtt_rounds):
            for name in rotated(names, round_):
                sample_us(clients[name].ping, chunk, samples[name])
    finally:
        gc.enable()
    return samples


# -- 3. memory -----------------------------------------------------------------


def memory(pid: int) -> tuple[int, int]:
    """RSS and USS of ``pid``, in bytes."""
    process = psutil.Process(pid)
    return process.memory_info().rss, process.memory_full_info().uss


# -- what limits it ------------------------------------------------------------


def shipped_python(code: str) -> str:
    """What ``python -c code`` prints on bench/.venv-busd's interpreter."""
    return stdout_of([str(SHIPPED_PYTHON), "-c", code], env=python_env())


def import_profile(argv: list[str], runs: int = 5) -> dict[str, float]:
    """Median self time (µs) of each module imported, under -X importtime."""
    per_module: dict[str, list[float]] = collections.defaultdict(list)
    env = python_env()
    env["PYTHONPROFILEIMPORTTIME"] = "1"
    for _ in range(runs):
        stderr = subprocess.run(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        ).stderr
        for line in stderr.splitlines():
            if not line.startswith("import time:") or "self [us]" in line:
                continue
            parts = line[len("import time:") :].split("|")
            per_module[parts[2].strip()].append(float(parts[0]))
    return {name: statistics.median(v) for name, v in per_module.items()}


def cli_analysis(commands: dict[str, list[str]]) -> list[str]:
    """Where ``busctl ping`` spends the time the floor client does not."""
    floor = import_profile(commands["floor client"])
    busctl = import_profile(commands["busctl ping"])
    extra = {name: us for name, us in busctl.items() if name not in floor}
    total_busctl = sum(busctl.values()) / 1000
    total_floor = sum(floor.values()) / 1000
    code = (
        "import time, busctl.cli as c\n"
        "t = time.perf_counter(); c.build_parser(); "
        "print((time.perf_counter() - t) * 1e3)"
    )
    parser_ms = statistics.median(float(shipped_python(code)) for _ in range(5))
    argparse_shutil = [
        m for m in ("shutil", "zlib", "bz2", "lzma", "fnmatch") if m in extra
    ]
    own = {n: us for n, us in extra.items() if n.split(".")[0] in ("busd", "busctl")}
    stdlib = {n: us for n, us in extra.items() if n not in own}
    re_parts = [n for n in extra if n in ("re", "_sre", "copyreg") or n[:3] == "re."]
    re_ms = sum(extra[n] for n in re_parts) / 1000

    def listing(modules: dict[str, float], count: int) -> str:
        top = sorted(modules.items(), key=lambda item: -item[1])[:count]
        return ", ".join(f"`{name}` {us / 1000:.1f}" for name, us in top)

    notes = [
        f"under `-X importtime` busctl ping spends {total_busctl:.0f} ms importing, "
        f"the floor {total_floor:.0f} ms; of the {len(extra)} modules only busctl "
        f"loads, its own take {sum(own.values()) / 1000:.1f} ms ({listing(own, 5)}) "
        f"and the standard library modules they pull in "
        f"{sum(stdlib.values()) / 1000:.1f} ms ({listing(stdlib, 8)} ms)",
    ]
    if "argparse" in extra:
        notes.append(
            f"`build_parser()` (12 subparsers with epilogs) takes {parser_ms:.1f} ms "
            "before any byte is sent"
        )
    else:
        notes.append(
            "`busctl ping` loads no argparse (its fast path); the other commands "
            f"build the parser, {parser_ms:.1f} ms"
        )
    if "re" in extra:
        notes.append(
            "pip's console script `bin/busctl` does `import re` (for `sys.argv[0]`) "
            f"before busctl runs: `re` and its parts {re_ms:.1f} ms"
        )
    if "typing" in extra:
        notes.append(
            "`typing` (with `contextlib`, `warnings`) is imported only for "
            "annotations, by busctl/__init__.py, busctl/cli.py, busctl/client.py, "
            "busd/__init__.py and busd/protocol.py, although all but the "
            "`__init__` files have `from __future__ import annotations`"
        )
    if argparse_shutil:
        notes.append(
            "argparse's HelpFormatter does `import shutil` (for the terminal "
            "width) on every `add_argument`, which drags in "
            + ", ".join(f"`{m}`" for m in argparse_shutil)
            + f" ({sum(extra[m] for m in argparse_shutil) / 1000:.1f} ms); "
            "argparse's gettext lookups import `locale`"
        )
    return notes


MEMORY_STEPS = (
    ("CPython, nothing imported", ""),
    ("+ ssl (asyncio imports it: OpenSSL's libraries)", "import ssl"),
    ("+ asyncio", "import asyncio"),
    ("+ psutil", "import psutil"),
    ("+ msgpack", "import msgpack"),
    (
        "+ logging, tomllib, json, subprocess",
        "import logging, tomllib, json, subprocess",
    ),
    (
        "+ busd.cli, busd.config, busd.daemon",
        "import busd.cli, busd.config, busd.daemon",
    ),
)


def memory_analysis() -> list[tuple[str, int, int]]:
    """RSS after each import step of what ``busd run`` loads: (step, rss, modules)."""
    code = [
        "import os, sys",
        "page = os.sysconf('SC_PAGE_SIZE')",
        "def rss(): return int(open('/proc/self/statm').read().split()[1]) * page",
    ]
    for step, statement in MEMORY_STEPS:
        if statement:
            code.append(statement)
        code.append(f"print({step!r}, rss(), len(sys.modules), sep='\\t')")
    runs = []
    for _ in range(3):
        out = shipped_python("\n".join(code))
        runs.append([line.split("\t") for line in out.splitlines()])
    return [
        (
            runs[0][i][0],
            int(statistics.median(int(run[i][1]) for run in runs)),
            int(runs[0][i][2]),
        )
        for i in range(len(MEMORY_STEPS))
    ]


def spy_profile(pid: int, sock: str, seconds: int, tmp: Path) -> dict:
    """py-spy samples of busd's I/O thread while one client pings it."""
    with Client(sock) as client:
        # Only the I/O thread (the main thread just waits on the bus);
        # epoll's wait is idle time.
        return spy_io_thread(
            pid,
            tmp / "py-spy.txt",
            seconds,
            250,
            client.ping,
            lambda frames: "IOLoop._run" in map(frame_name, frames),
            {"EpollSelector.select"},
        )


def rtt_analysis(spy: dict | None) -> list[str]:
    """What busd does per ping that the echo server does not."""
    lines = []
    if spy and spy["total"]:
        total = spy["total"]
        busy = total - spy["idle"]
        lines.append(
            f"py-spy on busd's I/O thread during a ping loop: busy (not in epoll) "
            f"in {busy / total:.0%} of {total} samples; innermost frames of the "
            f"busy ones: {shares(spy['leaves'], busy, 8)} (the socket send and "
            "recv are the echo server's cost too; the rest is busd's)"
        )
    lines.append(
        "busd answers a ping inside `Connection.data_received`, as the echo "
        "server does; what it does besides is per request: `parse_request`, "
        "the op lookup, the access check (worked out once per connection), a "
        "`RequestContext`, the op, the frame encoder and the Outbox's write"
    )
    return lines


# -- the report ----------------------------------------------------------------


@dataclass
class Results:
    """Every figure of one run, and the notes on what limits the missed ones."""

    settings: Settings
    cli: dict[str, list[float]]  # seconds per run
    cli_tool: str
    rtt: dict[str, list[float]]  # microseconds per call
    memory: dict[str, dict[str, tuple[int, int]]]  # process -> when -> (rss, uss)
    notes: dict[str, list[str]] = field(default_factory=dict)

    def cli_median(self, name: str) -> float:
        """Median wall time of the command ``name``, in ms."""
        return statistics.median(self.cli[name]) * 1000

    def p50(self, name: str) -> float:
        """Median round trip of the pair ``name``, in µs."""
        return statistics.median(self.rtt[name])

    def busd_rss(self) -> int:
        """busd's RSS, the worse of after start and after the benchmark."""
        return max(rss for rss, _uss in self.memory["busd"].values())


BUSD_CLIENT = "busctl.Client → busd"
ECHO_CLIENT = "busctl.Client → echo server"
BUSD_RAW = "raw client → busd"
ECHO_RAW = "raw client → echo server"
SUPERVISOR_RPC = "XML-RPC getState → supervisord"


def targets(r: Results) -> list[dict]:
    """The target rows; each also has its ``kind`` of figure, which names
    its note (``NOTE_TITLES``): what limits it, once looked for."""

    def row(figure: str, measured: str, goal: str, met: bool, kind: str) -> dict:
        limits = "" if met else "; ".join(r.notes.get(kind, []))
        return target(figure, measured, goal, met, limits, kind=kind)

    rows = []
    floor = r.cli_median("floor client")
    for command in ("busctl ping", "busctl state"):
        ratio = r.cli_median(command) / floor
        rows.append(
            row(
                f"`{command}` wall time / floor client",
                f"{ratio:.2f}x",
                f"≤ {CLI_FLOOR_RATIO}x",
                ratio <= CLI_FLOOR_RATIO,
                "cli",
            )
        )
    if "supervisorctl status" in r.cli:
        ratio = r.cli_median("supervisorctl status") / r.cli_median("busctl state")
        rows.append(
            row(
                "`supervisorctl status` / `busctl state` wall time",
                f"{ratio:.2f}x",
                f"≥ {CLI_PEER_RATIO}x",
                ratio >= CLI_PEER_RATIO,
                "cli-peer",
            )
        )
    for busd, echo, what in (
        (BUSD_CLIENT, ECHO_CLIENT, "busctl.Client"),
        (BUSD_RAW, ECHO_RAW, "raw client"),
    ):
        ratio = r.p50(busd) / r.p50(echo)
        rows.append(
            row(
                f"round trip p50, busd / echo server ({what})",
                f"{ratio:.2f}x",
                f"≤ {RTT_FLOOR_RATIO}x",
                ratio <= RTT_FLOOR_RATIO,
                "rtt",
            )
        )
    if SUPERVISOR_RPC in r.rtt:
        ratio = r.p50(SUPERVISOR_RPC) / r.p50(BUSD_CLIENT)
        rows.append(
            row(
                "round trip p50, supervisord getState / busd ping",
                f"{ratio:.2f}x",
                f"≥ {RTT_PEER_RATIO}x",
                ratio >= RTT_PEER_RATIO,
                "rtt-peer",
            )
        )
    rss = r.busd_rss()
    rows.append(
        row(
            "busd idle RSS (worst of after start / after the benchmark)",
            f"{rss / MiB:.1f} MiB",
            f"≤ {RSS_LIMIT / MiB:.0f} MiB",
            rss <= RSS_LIMIT,
            "memory",
        )
    )
    return rows


NOTE_TITLES = {
    "cli": "CLI wall time",
    "cli-peer": "CLI against supervisorctl",
    "rtt": "Round trip against the echo server",
    "rtt-peer": "Round trip against supervisord",
    "memory": "Idle memory",
}


def report(r: Results) -> str:
    """The target table (a note per kind of missed figure), then every figure."""
    rows = targets(r)
    notes = {
        NOTE_TITLES[row["kind"]]: row["limits"] + "."
        for row in rows
        if not row["met"] and row["limits"]
    }
    out = [target_table(rows, notes)]

    floor = r.cli_median("floor client")
    out += [
        "",
        f"### CLI wall time ({r.cli_tool})",
        "",
        *table_head("command", "median ms", "min-max ms", "runs", "/ floor client"),
    ]
    for name, times in r.cli.items():
        median = r.cli_median(name)
        out.append(
            f"| `{name}` | {median:.1f} | {min(times) * 1000:.1f}-"
            f"{max(times) * 1000:.1f} | {len(times)} | {median / floor:.2f}x |"
        )

    out += [
        "",
        "### Round trip on one connection",
        "",
        *table_head(
            "client → server", "p50 µs", "p99 µs", "calls", "p50 / busctl.Client → busd"
        ),
    ]
    base = r.p50(BUSD_CLIENT)
    for name, samples in r.rtt.items():
        out.append(
            f"| {name} | {r.p50(name):.1f} | {percentile(samples, 0.99):.1f} "
            f"| {len(samples):,} | {r.p50(name) / base:.2f}x |"
        )

    out += [
        "",
        "### Idle memory",
        "",
        *table_head(
            "process",
            *(f"RSS {when}" for when in MEMORY_WHEN),
            "USS after the benchmark",
        ),
    ]
    for name, figures in r.memory.items():
        cells = [f"{figures[when][0] / MiB:.1f} MiB" for when in MEMORY_WHEN]
        uss = figures[MEMORY_WHEN[-1]][1]
        out.append(f"| {name} | " + " | ".join(cells) + f" | {uss / MiB:.1f} MiB |")
    return "\n".join(out)


MEMORY_WHEN = ("after start", "after the benchmark")


def command(r: Results) -> str:
    """How the figures were taken, for the section's ``Command:`` line."""
    s = r.settings
    runs = s.cli_rounds * s.cli_runs
    return (
        "`.venv/bin/python bench/control.py --write` (CLI: "
        f"{r.cli_tool}, "
        f"{s.cli_rounds} interleaved rounds of {s.cli_runs} runs after "
        f"{s.cli_warmup} warmups, {runs} runs per command, median; round trips: "
        f"{s.calls:,} calls per client and server on one connection, in "
        f"{s.rtt_rounds} interleaved chunks; "
        + (
            f"supervisor {peer_version('supervisor')} from bench/.venv-peers"
            if s.peers
            else "no peers (--quick)"
        )
        + ")."
    )


# -- main ----------------------------------------------------------------------


def run(settings: Settings, tmp: Path, profile: bool) -> Results:
    """Start busd, the echo server and supervisord; take every figure."""
    with ending() as processes:
        rt = working_tree() if settings.quick else installed(tmp)
        busd, busd_sock = start_busd(
            tmp, busd=rt.busd, env=rt.env, deadline=STARTUP_DEADLINE
        )
        processes.append(busd)
        echo, echo_sock = start_echo(tmp, rt.python, rt.env, STARTUP_DEADLINE)
        processes.append(echo)
        conf = supervisor_sock = None
        memory_pids = {"busd": busd.pid}
        if settings.peers:
            ensure_peers(["supervisor", "py-spy"])
            supervisord, supervisor_sock, conf = start_supervisord(
                tmp, STARTUP_DEADLINE
            )
            processes.append(supervisord)
            memory_pids["supervisord"] = supervisord.pid
        time.sleep(0.5)  # let start-up settle before the idle figure
        mem: dict[str, dict[str, tuple[int, int]]] = {
            name: {"after start": memory(pid)} for name, pid in memory_pids.items()
        }

        commands = cli_commands(rt, busd_sock, conf)
        cli, tool = time_cli(commands, settings, rt.env)

        clients: dict[str, Any] = {
            BUSD_CLIENT: Client(busd_sock),
            ECHO_CLIENT: Client(echo_sock),
            BUSD_RAW: RawClient(busd_sock),
            ECHO_RAW: RawClient(echo_sock),
        }
        if supervisor_sock is not None:
            clients[SUPERVISOR_RPC] = SupervisorRPC(supervisor_sock)
        with closing_all(clients):
            rtt = time_round_trips(clients, settings)

        time.sleep(0.3)
        for name, pid in memory_pids.items():
            mem[name]["after the benchmark"] = memory(pid)
        results = Results(settings, cli, tool, rtt, mem)

        if not settings.quick:  # what limits each missed figure
            missed = {row["kind"] for row in targets(results) if not row["met"]}
            if "cli" in missed:
                results.notes["cli"] = cli_analysis(commands)
            if "rtt" in missed:
                spy = spy_profile(busd.pid, busd_sock, 3, tmp) if profile else None
                results.notes["rtt"] = rtt_analysis(spy)
            if "memory" in missed:
                results.notes["memory"] = memory_notes(results, memory_analysis())
        return results


def memory_notes(r: Results, steps: list[tuple[str, int, int]]) -> list[str]:
    """What busd's RSS is made of: the import steps, and the rest."""
    parts = [f"{steps[0][0]} {steps[0][1] / MiB:.1f} MiB"]
    for (_, before, _), (step, rss, _) in itertools.pairwise(steps):
        parts.append(f"{step} +{(rss - before) / MiB:.1f} MiB")
    loaded = steps[-1][1]
    rss = r.busd_rss()
    return [
        "RSS of a fresh interpreter importing what `busd run` imports, step by "
        "step: " + ", ".join(parts) + f" (= {loaded / MiB:.1f} MiB, "
        f"{steps[-1][2]} modules)",
        f"the running daemon's RSS is {(rss - loaded) / MiB:+.1f} MiB from that "
        "(it adds the I/O thread with its own malloc arena, the event loop, "
        "the log ring, buffers; a negative figure means pages of the imports "
        "it never touched)",
    ]


def main(argv: list[str] | None = None) -> int:
    """Take the figures, print them; with ``--write`` update RESULTS.md."""
    parser = options(
        __doc__, quick="smoke test: tiny counts, 1 round, busd against the floors only"
    )
    parser.add_argument(
        "--calls", type=int, default=5000, help="round trips per pair (default 5000)"
    )
    parser.add_argument(
        "--runs", type=int, default=32, help="CLI runs per command (>= 20)"
    )
    parser.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="skip py-spy in the notes",
    )
    args = parse(parser, argv, at_least={"runs": 20})
    settings = Settings.make(args.quick, args.calls, args.runs)
    host, results = measured(lambda tmp: run(settings, tmp, args.profile))
    text = report(results)
    rows = targets(results)
    return finish(args, host, text, rows, [(SECTION, command(results), text)])


if __name__ == "__main__":
    sys.exit(main())
