"""The processes the benchmarks compare: where they run from, starting, ending.

busd, the echo server (the floor) and supervisord are started the same way
by every benchmark that runs them: from here, on sockets in a scratch
directory, waited for until they answer, and ended by PID with everything
they started. Standard library and psutil only (imported where needed):
the peers' interpreter runs fleet.py, which imports this.

Importing this module puts the working tree first on ``sys.path``, so that
a benchmark's ``from busctl import Client`` is the tree's, not an
installed copy.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from _report import machine

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# -- running commands ------------------------------------------------------------


def stdout_of(argv: list[str], **options: Any) -> str:
    """Run ``argv`` to its end (``options`` go to subprocess.run); its
    standard output as text. Fails if it fails."""
    return subprocess.run(
        argv, capture_output=True, text=True, check=True, **options
    ).stdout


def quiet(argv: list[str], cwd: Path | None = None) -> subprocess.Popen:
    """Start ``argv`` with no input and its output thrown away (a peer or a
    tool that logs to a file of its own, if at all)."""
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=cwd,
    )


# -- where things run from -----------------------------------------------------

PEERS = BENCH / ".venv-peers"
# The peers, pinned: bench/run installs all of them, control.py and
# scaling.py what they need when run alone; the sections name the versions.
PEER_PACKAGES = (
    "supervisor==4.3.0",
    "circus==0.19.0",
    "CherryPy==18.10.0",
    "redis==8.1.0",
    "py-spy==0.4.3",
    "psutil==7.2.2",
)
# busd always runs on the project's interpreter, whichever venv runs the script:
# as users get it, from bench/.venv-busd (a normal install, refreshed by
# control.py, which bench/run runs first), or the working tree's .venv when
# there is none (--quick on a fresh machine). .venv's editable install adds
# an import hook costing every interpreter start ~30 ms here: busd's start
# and each worker's would be measured with it.
SHIPPED_VENV = BENCH / ".venv-busd"
SHIPPED_PYTHON = SHIPPED_VENV / "bin" / "python"
BUSD_PYTHON = (
    SHIPPED_PYTHON if SHIPPED_PYTHON.exists() else ROOT / ".venv" / "bin" / "python"
)
BUSD = (str(BUSD_PYTHON), "-m", "busd")
# Every scratch directory's name starts so: bench/run finds leftovers by it.
TMP_PREFIX = "busd-bench-"
STARTUP_DEADLINE = 30.0


def peer_version(name: str) -> str:
    """The pinned version of the peer package ``name`` (for the sections)."""
    for package in PEER_PACKAGES:
        project, _, version = package.partition("==")
        if project.lower() == name.lower():
            return version
    raise KeyError(name)


def ensure_peers(names: Iterable[str] | None = None) -> None:
    """Create bench/.venv-peers if missing; install the pinned peer packages
    (those ``names``, or all) that it lacks."""
    python = PEERS / "bin" / "python"
    if not python.exists():
        print(f"Creating {PEERS.relative_to(ROOT)} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEERS)], check=True)
    wanted = [name.lower() for name in names] if names is not None else None
    packages = [
        package
        for package in PEER_PACKAGES
        if wanted is None or package.partition("==")[0].lower() in wanted
    ]
    frozen = stdout_of([str(python), "-m", "pip", "freeze"]).lower()
    missing = [package for package in packages if package.lower() not in frozen]
    if missing:
        print("pip install " + " ".join(missing), file=sys.stderr, flush=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *missing], check=True
        )


def install_busd(tmp: Path) -> None:
    """Build a wheel of the working tree; install it into bench/.venv-busd.

    A normal (not editable) install with the runtime dependencies, as a
    user's ``pip install busd`` would give, so that every interpreter start
    is what a user's is. The venv is created on first use; the wheel is
    rebuilt and reinstalled on every run, the tree having changed.
    """
    import tomllib

    if not SHIPPED_PYTHON.exists():
        print(f"Creating {SHIPPED_VENV.relative_to(ROOT)} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(SHIPPED_VENV)], check=True)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip = [str(SHIPPED_PYTHON), "-m", "pip", "-q", "--disable-pip-version-check"]
    hushed: dict[str, Any] = {"stdout": subprocess.DEVNULL, "check": True}
    subprocess.run([*pip, "install", *project["dependencies"]], **hushed)
    wheels = tmp / "wheel"
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(ROOT)], **hushed)
    (wheel,) = wheels.glob("busd-*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--force-reinstall", str(wheel)], **hushed
    )


def redis_available() -> bool:
    """Whether redis-server and redis-benchmark are on PATH."""
    import shutil

    return bool(shutil.which("redis-server") and shutil.which("redis-benchmark"))


def python_env(pythonpath: str | None = None) -> dict[str, str]:
    """The environment of an interpreter as a user starts it: no PYTHONPATH
    (or exactly ``pythonpath``), no import-time profiling."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def child_env(**extra: str) -> dict[str, str]:
    """The environment for busd and its tools: the working tree first."""
    env = python_env(str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # A user's installed busd has its bytecode compiled (pip does that), as
    # the peers' in bench/.venv-peers have; without it, every busd and
    # worker start would compile the working tree's modules again.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra)
    return env


T = TypeVar("T")


def measured(run: Callable[[Path], T]) -> tuple[str, T]:
    """The machine line and ``run(tmp)``'s result, ``tmp`` a scratch directory
    for sockets, configs and logs, removed afterwards.

    The machine line is taken before the run: the load average in it is
    the others', not the benchmark's own.
    """
    host = machine()
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX) as tmp:
        return host, run(Path(tmp))


# -- waiting -------------------------------------------------------------------


def wait_until(
    check: Callable[[], bool],
    process: subprocess.Popen,
    what: str,
    deadline: float = STARTUP_DEADLINE,
    interval: float = 0.02,
) -> None:
    """Poll ``check`` until it is true; fail if ``process`` ends or time runs out.

    ``check`` may raise while ``process`` is still starting (nothing listens
    yet): that counts as not yet.
    """
    until = time.monotonic() + deadline
    while True:
        with contextlib.suppress(Exception):
            if check():
                return
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}")
        if time.monotonic() > until:
            raise RuntimeError(f"{what} not ready within {deadline} s")
        time.sleep(interval)  # polling another process: no event to wait on


def ready_or_ended(
    process: subprocess.Popen, check: Callable[[], bool], what: str, deadline: float
) -> None:
    """``wait_until``, ending ``process`` (and what it started) if it fails."""
    try:
        wait_until(check, process, what, deadline)
    except BaseException:
        stop_tree(process)
        raise


def pings(sock: str) -> Callable[[], bool]:
    """A check for ``wait_until``: the server on ``sock`` answers ``ping``."""

    def check() -> bool:
        from busctl import Client

        with Client(sock, timeout=2) as client:
            return client.ping() == "pong"

    return check


# -- busd and the echo server --------------------------------------------------


def noop_broker(**settings: object) -> str:
    """busd's config for one broker, ``bench``: bench_brokers:Noop (an ack at
    once: the trivial broker), run from bench/, with ``settings`` (each
    value as TOML writes it) after those."""
    lines = ["[brokers.bench]", 'handler = "bench_brokers:Noop"', f'cwd = "{BENCH}"']
    lines += [f"{key} = {value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def launch_busd(
    tmp: Path,
    config_text: str = "",
    busd: Sequence[str] = BUSD,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """Start ``busd run`` (``busd`` is its command) with ``config_text``, on a
    socket in ``tmp``, logging to tmp/busd.log; do not wait for it.

    ``env`` defaults to ``child_env()``.
    """
    config = tmp / "busd.toml"
    config.write_text(config_text)
    sock = str(tmp / "busd.sock")
    with open(tmp / "busd.log", "wb") as log:
        process = subprocess.Popen(
            [
                *(*busd, "run", "--config", str(config)),
                *("--socket", sock, "--pidfile", str(tmp / "busd.pid")),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=child_env() if env is None else env,
            cwd=tmp,
        )
    return process, sock


def start_busd(
    tmp: Path,
    config_text: str = "",
    ready: Callable[[str], Callable[[], bool]] = pings,
    busd: Sequence[str] = BUSD,
    env: dict[str, str] | None = None,
    deadline: float = STARTUP_DEADLINE,
) -> tuple[subprocess.Popen, str]:
    """``launch_busd``, returning once ``ready(sock)`` holds (by default: it
    answers ping)."""
    process, sock = launch_busd(tmp, config_text, busd, env)
    ready_or_ended(process, ready(sock), "busd", deadline)
    return process, sock


def start_echo(
    tmp: Path,
    python: str = str(BUSD_PYTHON),
    env: dict[str, str] | None = None,
    deadline: float = STARTUP_DEADLINE,
) -> tuple[subprocess.Popen, str]:
    """bench/echo_server.py on a socket in ``tmp``, once it answers ping.

    ``env`` defaults to ``child_env()``.
    """
    sock = str(tmp / "echo.sock")
    process = subprocess.Popen(
        [python, str(BENCH / "echo_server.py"), sock],
        stdin=subprocess.DEVNULL,
        env=child_env() if env is None else env,
    )
    ready_or_ended(process, pings(sock), "echo server", deadline)
    return process, sock


# -- supervisord ---------------------------------------------------------------

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

"""

# One idle program, and what supervisorctl needs to find supervisord.
SLEEPER = """\
[supervisorctl]
serverurl=unix://{tmp}/supervisor.sock

[program:sleeper]
command=sleep 3600
startsecs=0
autorestart=false
"""


def launch_supervisord(tmp: Path, programs: str) -> tuple[subprocess.Popen, str, Path]:
    """Start bench/.venv-peers' supervisord in the foreground on
    tmp/supervisor.sock with ``programs`` (config sections) after the common
    ones; do not wait for it. Returns the process, its socket and config."""
    conf = tmp / "supervisord.conf"
    conf.write_text(SUPERVISORD_CONF.format(tmp=tmp) + programs)
    sock = str(tmp / "supervisor.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    process = quiet([str(PEERS / "bin" / "supervisord"), "-c", str(conf)], tmp)
    return process, sock, conf


def start_supervisord(
    tmp: Path, deadline: float = STARTUP_DEADLINE
) -> tuple[subprocess.Popen, str, Path]:
    """supervisord with one ``sleep`` program (``SLEEPER``), once that runs."""
    process, sock, conf = launch_supervisord(tmp, SLEEPER.format(tmp=tmp))

    def sleeper_running() -> bool:
        info = supervisor_call(sock, "supervisor.getProcessInfo", "sleeper")
        return info["statename"] == "RUNNING"

    ready_or_ended(process, sleeper_running, "supervisord", deadline)
    return process, sock, conf


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection over a Unix socket (supervisord's)."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self.path = path

    def connect(self) -> None:
        """Connect to the Unix socket instead of a TCP host."""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


class SupervisorRPC:
    """XML-RPC over supervisord's Unix socket on one keep-alive connection,
    as ``supervisor.xmlrpc.SupervisorTransport`` does (stdlib only)."""

    def __init__(self, path: str) -> None:
        self.connection = UnixHTTPConnection(path)

    def call(self, method: str, *params: Any) -> Any:
        """Call ``method`` with ``params``; its result."""
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
        """supervisord's cheapest call, ``supervisor.getState``: its round trip."""
        return self.call("supervisor.getState")

    def close(self) -> None:
        """Close the connection."""
        self.connection.close()


def supervisor_call(sock: str, method: str, *params: Any) -> Any:
    """One XML-RPC call to supervisord on a connection of its own."""
    rpc = SupervisorRPC(sock)
    try:
        return rpc.call(method, *params)
    finally:
        rpc.close()


# -- ending --------------------------------------------------------------------


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """PIDs of every living descendant of ``pid`` (empty if it is gone)."""
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def end_pids(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM each PID still alive, then SIGKILL those that linger."""
    import psutil

    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            proc.terminate()
            procs.append(proc)
        except psutil.Error:
            pass
    _gone, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


def stop_tree(process: subprocess.Popen, grace: float = 10.0) -> None:
    """End a process started with Popen and everything it started, by PID.

    The descendants are listed first (a supervisor's workers may be in
    their own sessions), then the process gets SIGTERM, and whatever of
    them is still alive after it is ended too.
    """
    kids = descendants(process.pid)
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    end_pids(kids, grace=2.0)


@contextlib.contextmanager
def ending(*processes: subprocess.Popen) -> Iterator[list[subprocess.Popen]]:
    """A list to put started processes in; each is ended (``stop_tree``),
    the last started first, when the block ends, however it ends."""
    started = list(processes)
    try:
        yield started
    finally:
        for process in reversed(started):
            stop_tree(process)


@contextlib.contextmanager
def closing_all(clients: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Close every client in ``clients`` (those in it then) when the block
    ends, however it ends."""
    try:
        yield clients
    finally:
        for client in clients.values():
            client.close()


def join_or_kill(proc: Any, grace: float = 10.0) -> None:
    """Wait ``grace`` s for a multiprocessing child to end, then kill it."""
    proc.join(grace)
    if proc.is_alive():
        proc.kill()
        proc.join()
