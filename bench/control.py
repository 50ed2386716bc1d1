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

import argparse
import collections
import contextlib
import gc
import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
import xmlrpc.client
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common
import msgpack
import psutil
from _common import machine, now, percentile, wait_until, write_section

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))  # the working tree, not an installed copy

from busctl.client import Client  # noqa: E402

PEERS = BENCH / ".venv-peers"
BUSD_VENV = BENCH / ".venv-busd"  # a wheel of the working tree, installed
BUSD_PYTHON = BUSD_VENV / "bin" / "python"
PEER_PACKAGES = ("supervisor==4.3.0", "py-spy==0.4.3")
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
    quick: bool
    cli_rounds: int
    cli_runs: int  # per round
    cli_warmup: int
    calls: int  # round trips per client/server pair
    rtt_rounds: int
    peers: bool

    @classmethod
    def make(cls, quick: bool, calls: int, runs: int) -> Settings:
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


def child_env(pythonpath: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def installed(tmp: Path) -> Runtime:
    """busd as users get it: a wheel of the working tree in bench/.venv-busd."""
    install_busd(tmp)
    bin_ = BUSD_VENV / "bin"
    return Runtime(
        str(BUSD_PYTHON), [str(bin_ / "busd")], [str(bin_ / "busctl")], child_env()
    )


def working_tree() -> Runtime:
    """busd from the working tree, without installing (--quick: no index needed)."""
    python = sys.executable
    return Runtime(
        python,
        [python, "-m", "busd"],
        [python, "-m", "busctl"],
        child_env(str(ROOT)),
    )


def install_busd(tmp: Path) -> None:
    """Build a wheel of the working tree; install it into bench/.venv-busd.

    A normal (not editable) install with the runtime dependencies, as a
    user's ``pip install busd`` would give, so that every interpreter start
    is what a user's is. The venv is created on first use; the wheel is
    rebuilt and reinstalled on every run, the tree having changed.
    """
    if not BUSD_PYTHON.exists():
        print(f"Creating {BUSD_VENV.relative_to(ROOT)} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(BUSD_VENV)], check=True)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip = [str(BUSD_PYTHON), "-m", "pip", "-q", "--disable-pip-version-check"]
    quiet = {"stdout": subprocess.DEVNULL, "check": True}
    subprocess.run([*pip, "install", *project["dependencies"]], **quiet)
    wheels = tmp / "wheel"
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(ROOT)], **quiet)
    (wheel,) = wheels.glob("busd-*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--force-reinstall", str(wheel)], **quiet
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM by PID, then SIGKILL if it lingers."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(5)


def start_busd(tmp: Path, rt: Runtime) -> tuple[subprocess.Popen[bytes], str]:
    return _common.start_busd(tmp, rt.busd, rt.env, deadline=STARTUP_DEADLINE)


def start_echo(tmp: Path, rt: Runtime) -> tuple[subprocess.Popen[bytes], str]:
    return _common.start_echo(tmp, rt.python, rt.env, deadline=STARTUP_DEADLINE)


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

[supervisorctl]
serverurl=unix://{tmp}/supervisor.sock

[program:sleeper]
command=sleep 3600
startsecs=0
autorestart=false
"""


def ensure_peers(with_py_spy: bool) -> None:
    """Create bench/.venv-peers with supervisor (and py-spy) if missing."""
    wanted = [PEERS / "bin" / "supervisord"]
    if with_py_spy:
        wanted.append(PEERS / "bin" / "py-spy")
    if all(path.exists() for path in wanted):
        return
    if not (PEERS / "bin" / "python").exists():
        print(f"Creating {PEERS.relative_to(ROOT)} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(PEERS)], check=True)
    packages = PEER_PACKAGES if with_py_spy else PEER_PACKAGES[:1]
    subprocess.run(
        [str(PEERS / "bin" / "python"), "-m", "pip", "install", "-q", *packages],
        check=True,
    )


def start_supervisord(tmp: Path) -> tuple[subprocess.Popen[bytes], Path, str]:
    conf = tmp / "supervisord.conf"
    conf.write_text(SUPERVISORD_CONF.format(tmp=tmp))
    sock = str(tmp / "supervisor.sock")
    process = subprocess.Popen(
        [str(PEERS / "bin" / "supervisord"), "-c", str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def sleeper_running() -> bool:
        rpc = SupervisorRPC(sock)
        try:
            info = rpc.call("supervisor.getProcessInfo", "sleeper")
        finally:
            rpc.close()
        return info["statename"] == "RUNNING"

    wait_until(sleeper_running, process, "supervisord", STARTUP_DEADLINE)
    return process, conf, sock


# -- clients -------------------------------------------------------------------


class RawClient:
    """Framed request, framed answer, nothing else: the like-for-like client."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.ids = 0

    def ping(self) -> Any:
        self.ids += 1
        body = msgpack.packb({"id": self.ids, "op": "ping"}, use_bin_type=True)
        self.sock.sendall(struct.pack(">I", len(body)) + body)
        data = self.sock.recv(65536)
        while len(data) < 4 or len(data) < 4 + struct.unpack_from(">I", data)[0]:
            data += self.sock.recv(65536)
        return msgpack.unpackb(data[4:], raw=False)["result"]

    def close(self) -> None:
        self.sock.close()


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


class SupervisorRPC:
    """XML-RPC over supervisord's Unix socket on one keep-alive connection,
    as ``supervisor.xmlrpc.SupervisorTransport`` does (stdlib only)."""

    def __init__(self, path: str) -> None:
        self.connection = UnixHTTPConnection(path)

    def call(self, method: str, *params: Any) -> Any:
        body = xmlrpc.client.dumps(params, method).encode()
        self.connection.request(
            "POST", "/RPC2", body, {"Content-Type": "text/xml", "Accept": "text/xml"}
        )
        response = self.connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"supervisord answered HTTP {response.status}")
        return xmlrpc.client.loads(data)[0][0]

    def ping(self) -> Any:
        return self.call("supervisor.getState")

    def close(self) -> None:
        self.connection.close()


# -- 1. CLI wall time ----------------------------------------------------------


def cli_commands(
    rt: Runtime, busd_sock: str, supervisor_conf: Path | None
) -> dict[str, list[str]]:
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


def rotated(names: list[str], round_: int) -> list[str]:
    shift = round_ % len(names)
    return names[shift:] + names[:shift]


def time_cli(
    commands: dict[str, list[str]], settings: Settings, tmp: Path, env: dict[str, str]
):
    """Wall seconds per run of each command, rounds interleaved; and the tool."""
    names = list(commands)
    times: dict[str, list[float]] = {name: [] for name in names}
    hyperfine = find_hyperfine()
    for round_ in range(settings.cli_rounds):
        order = rotated(names, round_)
        if hyperfine:
            export = tmp / f"hyperfine{round_}.json"
            argv = [hyperfine, "-N", "--style", "none", "--export-json", str(export)]
            argv += ["--warmup", str(settings.cli_warmup)]
            argv += ["--runs", str(settings.cli_runs)]
            for name in order:
                argv += ["-n", name, " ".join(commands[name])]
            done = subprocess.run(
                argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            if done.returncode:
                sys.stderr.buffer.write(done.stderr)
                raise RuntimeError(f"hyperfine failed with status {done.returncode}")
            for result in json.loads(export.read_text())["results"]:
                times[result["command"]] += result["times"]
        else:
            for name in order:
                for _ in range(settings.cli_warmup):
                    run_once(commands[name], env)
            for _ in range(settings.cli_runs):
                for name in order:
                    times[name].append(run_once(commands[name], env))
    tool = "hyperfine" if hyperfine else "subprocess + perf_counter"
    return times, tool


def find_hyperfine() -> str | None:
    """hyperfine's path if it is there and has ``-N`` (1.13 or later)."""
    path = shutil.which("hyperfine")
    if path is None:
        print("hyperfine not found: timing with subprocess", file=sys.stderr)
        return None
    version = subprocess.run([path, "--version"], capture_output=True, text=True)
    numbers = version.stdout.split()[-1].split(".") if version.stdout else []
    if tuple(int(n) for n in numbers[:2] if n.isdigit()) < (1, 13):
        print(f"{version.stdout.strip()} lacks -N: using subprocess", file=sys.stderr)
        return None
    return path


def run_once(argv: list[str], env: dict[str, str]) -> float:
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
    clock = time.perf_counter_ns
    gc.disable()
    try:
        for round_ in range(settings.rtt_rounds):
            for name in rotated(names, round_):
                ping = clients[name].ping
                out = samples[name]
                for _ in range(chunk):
                    start = clock()
                    ping()
                    out.append((clock() - start) / 1000)
    finally:
        gc.enable()
    return samples


# -- 3. memory -----------------------------------------------------------------


def memory(pid: int) -> tuple[int, int]:
    process = psutil.Process(pid)
    return process.memory_info().rss, process.memory_full_info().uss


# -- what limits it ------------------------------------------------------------


def import_profile(argv: list[str], runs: int = 5) -> dict[str, float]:
    """Median self time (µs) of each module imported, under -X importtime."""
    per_module: dict[str, list[float]] = collections.defaultdict(list)
    env = child_env()
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
    parser_ms = statistics.median(
        float(
            subprocess.run(
                [str(BUSD_PYTHON), "-c", code],
                env=child_env(),
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        for _ in range(5)
    )
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
        out = subprocess.run(
            [str(BUSD_PYTHON), "-c", "\n".join(code)],
            env=child_env(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        runs.append([line.split("\t") for line in out.splitlines()])
    return [
        (
            runs[0][i][0],
            int(statistics.median(int(run[i][1]) for run in runs)),
            int(runs[0][i][2]),
        )
        for i in range(len(MEMORY_STEPS))
    ]


def spy_profile(pid: int, sock: str, seconds: float, tmp: Path) -> collections.Counter:
    """py-spy samples of busd while one client pings it: frame -> samples."""
    output = tmp / "py-spy.txt"
    spy = subprocess.Popen(
        [
            *(str(PEERS / "bin" / "py-spy"), "record", "--pid", str(pid)),
            *("--duration", str(int(seconds)), "--rate", "250", "--format", "raw"),
            *("--output", str(output)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with Client(sock) as client:
            deadline = time.monotonic() + seconds + 1
            while spy.poll() is None and time.monotonic() < deadline + 5:
                client.ping()
        spy.wait(15)
    finally:
        stop(spy)
    # Only the I/O thread (the main thread just waits on the bus); count
    # the innermost frame of each sample, epoll's wait being idle time.
    leaves: collections.Counter = collections.Counter()
    for line in output.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [frame.split(" (")[0] for frame in stack.split(";") if frame]
        if "ControlServer._run_loop" in frames:
            leaves[frames[-1]] += int(count)
    return leaves


def rtt_analysis(leaves: collections.Counter | None) -> list[str]:
    lines = []
    if leaves:
        total = sum(leaves.values())
        busy = total - leaves.pop("EpollSelector.select", 0)
        top = ", ".join(
            f"`{name}` {count / busy:.0%}" for name, count in leaves.most_common(8)
        )
        lines.append(
            f"py-spy on busd's I/O thread during a ping loop: busy (not in epoll) "
            f"in {busy / total:.0%} of {total} samples; innermost frames of the "
            f"busy ones: {top} (the socket send and recv are the echo server's "
            "cost too; the rest is busd's)"
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
    settings: Settings
    cli: dict[str, list[float]]  # seconds per run
    cli_tool: str
    rtt: dict[str, list[float]]  # microseconds per call
    memory: dict[str, dict[str, tuple[int, int]]]  # process -> when -> (rss, uss)
    notes: dict[str, list[str]] = field(default_factory=dict)

    def cli_median(self, name: str) -> float:
        return statistics.median(self.cli[name]) * 1000

    def p50(self, name: str) -> float:
        return statistics.median(self.rtt[name])

    def busd_rss(self) -> int:
        return max(rss for rss, _uss in self.memory["busd"].values())


BUSD_CLIENT = "busctl.Client → busd"
ECHO_CLIENT = "busctl.Client → echo server"
BUSD_RAW = "raw client → busd"
ECHO_RAW = "raw client → echo server"
SUPERVISOR_RPC = "XML-RPC getState → supervisord"


def targets(r: Results) -> list[tuple[str, str, str, bool, str]]:
    """(figure, measured, goal, met, note key) for each target."""
    rows = []
    floor = r.cli_median("floor client")
    for command in ("busctl ping", "busctl state"):
        ratio = r.cli_median(command) / floor
        rows.append(
            (
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
            (
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
            (
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
            (
                "round trip p50, supervisord getState / busd ping",
                f"{ratio:.2f}x",
                f"≥ {RTT_PEER_RATIO}x",
                ratio >= RTT_PEER_RATIO,
                "rtt-peer",
            )
        )
    rss = r.busd_rss()
    rows.append(
        (
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
    rows = targets(r)
    out = ["| target | measured | goal | met |", "|---|---:|---:|---|"]
    for figure, measured, goal, met, _key in rows:
        out.append(f"| {figure} | {measured} | {goal} | {'yes' if met else '**no**'} |")
    missed = [key for *_rest, met, key in rows if not met]
    notes = [key for key in dict.fromkeys(missed) if r.notes.get(key)]
    if notes:
        out += ["", "What limits the missed figures:", ""]
        for key in notes:
            out.append(f"- **{NOTE_TITLES[key]}**: " + "; ".join(r.notes[key]) + ".")

    floor = r.cli_median("floor client")
    out += [
        "",
        f"### CLI wall time ({r.cli_tool})",
        "",
        "| command | median ms | min-max ms | runs | / floor client |",
        "|---|---:|---:|---:|---:|",
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
        "| client → server | p50 µs | p99 µs | calls | p50 / busctl.Client → busd |",
        "|---|---:|---:|---:|---:|",
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
        "| process | "
        + " | ".join(f"RSS {when}" for when in MEMORY_WHEN)
        + " | USS after the benchmark |",
        "|---|" + "---:|" * (len(MEMORY_WHEN) + 1),
    ]
    for name, figures in r.memory.items():
        cells = [f"{figures[when][0] / MiB:.1f} MiB" for when in MEMORY_WHEN]
        uss = figures[MEMORY_WHEN[-1]][1]
        out.append(f"| {name} | " + " | ".join(cells) + f" | {uss / MiB:.1f} MiB |")
    return "\n".join(out)


MEMORY_WHEN = ("after start", "after the benchmark")


def section(r: Results, host: str) -> str:
    s = r.settings
    runs = s.cli_rounds * s.cli_runs
    return (
        f"{SECTION}\n\n"
        f"Machine: {host}.  \n"
        f"Date: {now()}.  \n"
        "Command: `.venv/bin/python bench/control.py --write` (CLI: "
        f"{r.cli_tool}, "
        f"{s.cli_rounds} interleaved rounds of {s.cli_runs} runs after "
        f"{s.cli_warmup} warmups, {runs} runs per command, median; round trips: "
        f"{s.calls:,} calls per client and server on one connection, in "
        f"{s.rtt_rounds} interleaved chunks; "
        + (
            f"supervisor {PEER_PACKAGES[0].split('==')[1]} from bench/.venv-peers"
            if s.peers
            else "no peers (--quick)"
        )
        + ").\n\n"
        f"{report(r)}\n"
    )


# -- main ----------------------------------------------------------------------


@contextlib.contextmanager
def closing_all(clients: dict[str, Any]) -> Iterator[dict[str, Any]]:
    try:
        yield clients
    finally:
        for client in clients.values():
            client.close()


def run(settings: Settings, tmp: Path, profile: bool) -> Results:
    processes: list[subprocess.Popen[bytes]] = []
    sleeper_pid = None
    try:
        rt = working_tree() if settings.quick else installed(tmp)
        busd, busd_sock = start_busd(tmp, rt)
        processes.append(busd)
        echo, echo_sock = start_echo(tmp, rt)
        processes.append(echo)
        conf = supervisor_sock = None
        if settings.peers:
            ensure_peers(with_py_spy=True)
            supervisord, conf, supervisor_sock = start_supervisord(tmp)
            processes.append(supervisord)
            rpc = SupervisorRPC(supervisor_sock)
            sleeper_pid = rpc.call("supervisor.getProcessInfo", "sleeper")["pid"]
            rpc.close()
        time.sleep(0.5)  # let start-up settle before the idle figure
        memory_pids = {"busd": busd.pid}
        if settings.peers:
            memory_pids["supervisord"] = processes[-1].pid
        mem: dict[str, dict[str, tuple[int, int]]] = {
            name: {"after start": memory(pid)} for name, pid in memory_pids.items()
        }

        commands = cli_commands(rt, busd_sock, conf)
        cli, tool = time_cli(commands, settings, tmp, rt.env)

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
            missed = {key for *_rest, met, key in targets(results) if not met}
            if "cli" in missed:
                results.notes["cli"] = cli_analysis(commands)
            if "rtt" in missed:
                spy = spy_profile(busd.pid, busd_sock, 3, tmp) if profile else None
                results.notes["rtt"] = rtt_analysis(spy)
            if "memory" in missed:
                results.notes["memory"] = memory_notes(results, memory_analysis())
        return results
    finally:
        for process in reversed(processes):
            stop(process)
        if sleeper_pid and psutil.pid_exists(sleeper_pid):
            with contextlib.suppress(psutil.Error):
                leftover = psutil.Process(sleeper_pid)
                if leftover.name() == "sleep":
                    leftover.kill()


def memory_notes(r: Results, steps: list[tuple[str, int, int]]) -> list[str]:
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"update {SECTION!r}")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: tiny counts, 1 round, busd against the floors only",
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
    args = parser.parse_args(argv)
    if not args.quick and args.runs < 20:
        parser.error("--runs must be at least 20")
    if args.quick and args.write:
        parser.error("--quick figures are not for RESULTS.md")
    settings = Settings.make(args.quick, args.calls, args.runs)
    host = machine()  # before the run: the load average is the others'
    with tempfile.TemporaryDirectory(prefix="busd-bench-") as tmp:
        results = run(settings, Path(tmp), args.profile)
    print(f"Machine: {host}\n")
    print(report(results))
    if args.write:
        write_section(SECTION, section(results, host))
        print(f"\nUpdated {BENCH / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
