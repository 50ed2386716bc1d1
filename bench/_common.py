"""Helpers shared by the benchmarks: the machine line and RESULTS.md sections."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
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


# -- helpers for the scenario scripts (stdlib + psutil: the peers venv runs them too)

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEERS = BENCH / ".venv-peers"
# busd always runs on the project's interpreter, whichever venv runs the script:
# as users get it, from bench/.venv-busd (a normal install, refreshed by
# control.py, which bench/run runs first), or the working tree's .venv when
# there is none (--quick on a fresh machine). .venv's editable install adds
# an import hook costing every interpreter start ~30 ms here: busd's start
# and each worker's would be measured with it.
SHIPPED_PYTHON = BENCH / ".venv-busd" / "bin" / "python"
BUSD_PYTHON = (
    SHIPPED_PYTHON if SHIPPED_PYTHON.exists() else ROOT / ".venv" / "bin" / "python"
)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for busd and its tools: the working tree first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    # A user's installed busd has its bytecode compiled (pip does that), as
    # the peers' in bench/.venv-peers have; without it, every busd and
    # worker start would compile the working tree's modules again.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra)
    return env


STARTUP_DEADLINE = 30.0


def wait_until(
    check: Callable[[], bool],
    process: subprocess.Popen,
    what: str,
    deadline: float = STARTUP_DEADLINE,
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
        time.sleep(0.02)  # polling another process: no event to wait on


def pings(sock: str) -> Callable[[], bool]:
    """A check for ``wait_until``: the server on ``sock`` answers ``ping``."""

    def check() -> bool:
        from busctl.client import Client  # the caller put the tree on sys.path

        with Client(sock, timeout=2) as client:
            return client.ping() == "pong"

    return check


def start_busd(
    tmp: Path,
    busd: list[str],
    env: dict[str, str],
    config_text: str = "",
    ready: Callable[[str], Callable[[], bool]] = pings,
    deadline: float = STARTUP_DEADLINE,
) -> tuple[subprocess.Popen, str]:
    """``busd run`` (``busd`` is its command) with ``config_text``, on a
    socket in ``tmp``, logging to tmp/busd.log; return once ``ready(sock)``
    holds (by default: it answers ping)."""
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
            env=env,
            cwd=tmp,
        )
    wait_until(ready(sock), process, "busd", deadline)
    return process, sock


def start_echo(
    tmp: Path, python: str, env: dict[str, str], deadline: float = STARTUP_DEADLINE
) -> tuple[subprocess.Popen, str]:
    """bench/echo_server.py on a socket in ``tmp``, once it answers ping."""
    sock = str(tmp / "echo.sock")
    process = subprocess.Popen(
        [python, str(BENCH / "echo_server.py"), sock],
        stdin=subprocess.DEVNULL,
        env=env,
    )
    wait_until(pings(sock), process, "echo server", deadline)
    return process, sock


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the kernel's pick)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


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


def stop_tree(process, grace: float = 10.0) -> None:
    """End a process started with Popen and everything it started, by PID.

    The descendants are listed first (a supervisor's workers may be in
    their own sessions), then the process gets SIGTERM, and whatever of
    them is still alive after it is ended too.
    """
    import subprocess

    kids = descendants(process.pid)
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    end_pids(kids, grace=2.0)


def write_targets(path: str | None, rows: list[dict]) -> None:
    """Hand the target rows to bench/run (``--targets-json PATH``).

    Each row: ``figure``, ``measured``, ``goal``, ``met`` and ``limits``
    (what limits a missed figure, or "").
    """
    if path:
        import json

        Path(path).write_text(json.dumps(rows, indent=1))


def target_table(rows: list[dict]) -> str:
    out = ["| target | measured | goal | met |", "|---|---:|---:|---|"]
    for row in rows:
        met = "yes" if row["met"] else "**no**"
        out.append(f"| {row['figure']} | {row['measured']} | {row['goal']} | {met} |")
    missed = [row for row in rows if not row["met"] and row.get("limits")]
    if missed:
        out += ["", "What limits the missed figures:", ""]
        out += [f"- **{row['figure']}**: {row['limits']}" for row in missed]
    return "\n".join(out)
