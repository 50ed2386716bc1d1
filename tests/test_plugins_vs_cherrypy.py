"""busd.plugins side by side with ``cherrypy.process.plugins``, the reference.

Each scenario runs once with CherryPy's bus and plugin classes and once
with busd's, imported under the same names, and the observable results
(files, their contents and modes, process ids, umask, descriptors) must be
the same. Whatever changes the process itself (daemonizing, dropping
privileges) runs in child processes, one per implementation, started and
ended here by their PIDs. The deliberate differences listed in docs/bus.md
are asserted on both sides, so that each shows what CherryPy does instead.

Sections: Daemonizer, PIDFile, DropPrivileges. Other plugins may add
sections of their own.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import reap, subreaper, without_systemd_environment

TIMEOUT = 15.0
IMPLEMENTATIONS = ("busd", "cherrypy")

# The same names, from either implementation: the program under test is
# written once, against CherryPy's API.
IMPORTS = {
    "busd": "from busd import plugins\nfrom busd.bus import Bus\n",
    "cherrypy": (
        "from cherrypy.process import plugins\n"
        "from cherrypy.process.wspbus import Bus\n"
    ),
}


def program(impl: str, body: str) -> str:
    return IMPORTS[impl] + body


def wait_for_file(path: Path, timeout: float = TIMEOUT) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text().endswith("\n"):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} not written within {timeout} s")
        time.sleep(0.01)
    return path.read_text()


# -- Daemonizer ---------------------------------------------------------------

# A program as CherryPy's documentation has it: a log file opened first,
# then Daemonizer and PIDFile with their default options. After the start
# it reports what it sees, waits for the test's go (the test looks at it
# meanwhile), then exits the bus.
DAEMONIZING = r"""
import json, logging, os, sys, time

log_path, pidfile, out, report_path, go_path, inherited = sys.argv[1:7]
logger = logging.getLogger("app")
logger.addHandler(logging.FileHandler(log_path))
logger.setLevel(logging.INFO)
bus = Bus()
plugins.Daemonizer(bus, stdout=out, stderr=out).subscribe()
pid_plugin = plugins.PIDFile(bus, pidfile)
pid_plugin.subscribe()
bus.start()
logger.info("after detaching: PID %d", os.getpid())
with open(f"/proc/self/status") as status:
    umask = [line.split()[1] for line in status if line.startswith("Umask:")][0]
report = {
    "pid": os.getpid(),
    "sid": os.getsid(0),
    "pidfile": open(pidfile).read(),
    "pidfile_mode": oct(os.stat(pidfile).st_mode & 0o777),
    "cwd": os.getcwd(),
    "umask": umask,
    "stdio": [os.readlink(f"/proc/self/fd/{fd}") for fd in range(3)],
    "inherited_kept": os.path.exists(f"/proc/self/fd/{inherited}"),
    "finalized": pid_plugin.finalized,
}
with open(report_path + ".tmp", "w") as file:
    file.write(json.dumps(report) + "\n")
os.rename(report_path + ".tmp", report_path)
deadline = time.monotonic() + 15
while not os.path.exists(go_path) and time.monotonic() < deadline:
    time.sleep(0.01)
bus.exit()
logger.info("pidfile left: %s", os.path.exists(pidfile))
"""


def daemonize(impl: str, where: Path, inherited: int) -> dict[str, Any]:
    """Run DAEMONIZING with ``impl``; what it reported and left behind."""
    where.mkdir()
    log, pidfile, out = where / "app.log", where / "app.pid", where / "out.log"
    report_path, go = where / "report.json", where / "go"
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-c",
            program(impl, DAEMONIZING),
            *map(str, (log, pidfile, out, report_path, go, inherited)),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=[inherited],
        cwd=where,
        env=without_systemd_environment(),
    )
    daemon_pid: int | None = None
    try:
        launched = launcher.wait(TIMEOUT)
        report = json.loads(wait_for_file(report_path))
        daemon_pid = report["pid"]
        assert reap(report["sid"]) == 0  # the first child, the session leader
        adopted = psutil.Process(daemon_pid).ppid() == os.getpid()
        go.touch()
        assert reap(daemon_pid) == 0
        daemon_pid = None
    finally:
        if launcher.poll() is None:
            os.kill(launcher.pid, signal.SIGKILL)
            launcher.wait(TIMEOUT)
        if daemon_pid is not None and psutil.pid_exists(daemon_pid):
            os.kill(daemon_pid, signal.SIGKILL)
            reap(daemon_pid)
    pid, sid = report.pop("pid"), report.pop("sid")
    logged = log.read_text()
    return {
        "launcher_status": launched,
        "daemon_is_not_the_launcher": pid != launcher.pid,
        "new_session_not_led_by_it": sid not in (pid, os.getsid(0)),
        "daemon_was_adopted": adopted,
        "pidfile_is_the_pid": report.pop("pidfile") == f"{pid}\n",
        "pidfile_left": (where / "app.pid").exists(),
        "log_went_on_in_its_file": f"after detaching: PID {pid}\n" in logged,
        "log_after_exit": "pidfile left: False\n" in logged,
        "cwd_is_the_launchers": report.pop("cwd") == str(where),
        "stdio": [
            os.path.relpath(target, where) if target.startswith(str(where)) else target
            for target in report.pop("stdio")
        ],
        **report,
    }


def test_daemonizer_and_pidfile_behave_as_cherrypys(tmp_path: Path) -> None:
    results = {}
    with subreaper(), open(tmp_path / "inherited.txt", "w") as inherited:
        for impl in IMPLEMENTATIONS:
            results[impl] = daemonize(impl, tmp_path / impl, inherited.fileno())
    # A deliberate difference (docs/bus.md): busd's PID file is 0644 under
    # any umask; CherryPy's follows the daemon's umask 0, writable by all.
    assert results["cherrypy"].pop("pidfile_mode") == "0o666"
    assert results["busd"].pop("pidfile_mode") == "0o644"
    assert results["busd"] == results["cherrypy"]
    assert results["busd"] == {
        "launcher_status": 0,
        "daemon_is_not_the_launcher": True,
        "new_session_not_led_by_it": True,
        "daemon_was_adopted": True,
        "pidfile_is_the_pid": True,
        "pidfile_left": False,
        "log_went_on_in_its_file": True,
        "log_after_exit": True,
        "cwd_is_the_launchers": True,
        "stdio": [os.devnull, "out.log", "out.log"],
        "umask": "0000",
        "inherited_kept": True,
        "finalized": True,
    }


# -- PIDFile --------------------------------------------------------------------


def pidfile_scenario(impl: str, where: Path) -> dict[str, Any]:
    """Stale file, start, exit: what each implementation leaves, in process."""
    if impl == "busd":
        from busd import plugins
        from busd.bus import Bus
    else:
        from cherrypy.process import plugins  # type: ignore[no-redef]
        from cherrypy.process.wspbus import Bus  # type: ignore[no-redef]
    where.mkdir()
    path = where / "app.pid"
    path.write_text("999999999\n")  # stale: no such process
    previous = os.umask(0o022)
    try:
        bus = Bus()
        plugin = plugins.PIDFile(bus, pidfile=str(path))
        before = (plugin.pidfile, plugin.finalized)
        plugin.subscribe()
        bus.start()
        during = (
            path.read_text(),
            stat.S_IMODE(path.stat().st_mode),
            plugin.finalized,
            sorted(p.name for p in where.iterdir()),
        )
        bus.exit()
    finally:
        os.umask(previous)
    return {"before": before, "during": during, "left": path.exists()}


def test_pidfile_behaves_as_cherrypys(tmp_path: Path) -> None:
    results = {
        impl: pidfile_scenario(impl, tmp_path / impl) for impl in IMPLEMENTATIONS
    }
    for impl, result in results.items():
        assert result["before"] == (str(tmp_path / impl / "app.pid"), False)
        result.pop("before")
    assert results["busd"] == results["cherrypy"]
    assert results["busd"] == {
        "during": (f"{os.getpid()}\n", 0o644, True, ["app.pid"]),
        "left": False,
    }


# -- DropPrivileges --------------------------------------------------------------

NOBODY = pwd.getpwnam("nobody")
NOGROUP = grp.getgrgid(NOBODY.pw_gid)

# Drops privileges with the arguments in argv[1] (a JSON list and object),
# then reports the process's ids, groups and umask as /proc shows them.
DROPPING = r"""
import json, sys
args, kwargs = json.loads(sys.argv[1])
bus = Bus()
plugin = plugins.DropPrivileges(bus, *args, **kwargs)
plugin.subscribe()
bus.start()
status = {}
with open("/proc/self/status") as file:
    for line in file:
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups", "Umask"):
            status[key] = value.split()
status["properties"] = [plugin.umask, plugin.uid, plugin.gid, plugin.finalized]
print(json.dumps(status), flush=True)
bus.exit()
"""

DROPS: dict[str, tuple[list[Any], dict[str, Any]]] = {
    "umask-positional": ([0o027], {}),
    "uid-gid-names": ([], {"umask": 0o022, "uid": "nobody", "gid": NOGROUP.gr_name}),
    "uid-only": ([], {"uid": NOBODY.pw_uid}),
    "gid-only": ([0o077, None, NOGROUP.gr_gid], {}),
}


def drop(impl: str, args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", program(impl, DROPPING), json.dumps([args, kwargs])],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd="/",  # readable by nobody too
        env=without_systemd_environment(),
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owner needs root")
@pytest.mark.parametrize("case", sorted(DROPS))
def test_drop_privileges_behaves_as_cherrypys(case: str) -> None:
    args, kwargs = DROPS[case]
    results = {impl: drop(impl, args, kwargs) for impl in IMPLEMENTATIONS}
    assert results["busd"] == results["cherrypy"]
    status = results["busd"]
    umask, uid, gid, finalized = status["properties"]
    assert finalized is True
    if uid is not None:
        assert uid == NOBODY.pw_uid
        assert status["Uid"] == [str(uid)] * 4
    if gid is not None:
        assert gid == NOGROUP.gr_gid
        assert status["Gid"] == [str(gid)] * 4
        assert status["Groups"] == []  # CherryPy's: supplementary groups emptied
    if umask is not None:
        assert status["Umask"] == [f"{umask:04o}"]
