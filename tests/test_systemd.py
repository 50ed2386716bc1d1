"""systemd/busd.service in a real systemd: start, reload, crash, restart, stop.

One throw-away systemd instance per module (tests/systemd_harness.py). In
it: the busd user from systemd/busd.sysusers, the unit exactly as shipped,
a config with the ``orders`` broker, and one drop-in that only points
ExecStart= at this checkout (and shows this machine's interpreter through
ProtectHome=, see :func:`drop_in`). Everything else, the dedicated user and
every hardening option included, is what an installation gets.
"""

from __future__ import annotations

import json
import os
import random
import re
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_for
from systemd_harness import Instance, booted, unavailable

REPO = Path(__file__).resolve().parent.parent
UNIT_DIR = REPO / "systemd"
VENV_BIN = Path(sys.executable).parent
UNIT = "busd.service"
SOCKET = "/run/busd/busd.sock"
CONFIG_PATH = "/etc/busd/busd.toml"
HOME_DIRS = ("/root", "/home", "/run/user")
WATCHDOG_SEC = 4
TIMEOUT = 30.0

CONFIG = """\
[busd]
socket = "{socket}"
pidfile = "/run/busd/busd.pid"
spool = "/var/lib/busd"
log_level = "info"

[brokers.orders]
handler = "examples.stock:OrderBroker"
cwd = "{repo}"
channels = ["main"]
instances = {instances}
stop_timeout = 5
"""

reason = unavailable()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")


def config(instances: int = 2) -> str:
    return CONFIG.format(socket=SOCKET, repo=REPO, instances=instances)


def under(path: str, parents: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in parents)


def world_readable(path: str) -> bool:
    mode = os.stat(path).st_mode
    return bool(mode & stat.S_IROTH and mode & stat.S_IXOTH)


def needed_paths() -> list[str]:
    """This checkout and the interpreter's installation (venv and base)."""
    paths = {str(REPO), os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)}
    return sorted(p for p in paths if not any(under(p, (q,)) for q in paths - {p}))


def drop_in() -> str:
    """The test's only changes to the shipped unit, each with its reason."""
    lines = [
        "[Service]",
        "# This checkout's busd, from the virtualenv running the tests; the",
        "# shipped ExecStart= expects a system-wide install.",
        "ExecStart=",
        f"ExecStart={VENV_BIN / 'busd'} run --config {CONFIG_PATH}",
        "# The venv may hold a non-editable install: import this checkout.",
        f"Environment=PYTHONPATH={REPO}",
        "# Short, so that missing WATCHDOG=1 pings would kill busd during the test.",
        f"WatchdogSec={WATCHDOG_SEC}s",
    ]
    private = [p for p in needed_paths() if under(p, ("/tmp", "/var/tmp"))]
    if private:
        lines += [
            "# PrivateTmp= gives busd a /tmp of its own: show this checkout",
            "# (CI may clone under /tmp) in it.",
            "BindReadOnlyPaths=" + " ".join(private),
        ]
    hidden = [p for p in needed_paths() if under(p, HOME_DIRS)]
    if hidden and all(world_readable(p) for p in hidden):
        lines += [
            "# ProtectHome=yes hides /root, where this machine's Python lives",
            "# (pyenv): keep the rest of home hidden, show only the interpreter.",
            "ProtectHome=tmpfs",
            "BindReadOnlyPaths=" + " ".join(hidden),
        ]
    elif hidden:
        lines += [
            "# The interpreter is in a home directory the busd user cannot read:",
            "# run as root (the unit's hardening still applies).",
            "ProtectHome=read-only",
            "User=root",
            "Group=root",
        ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def systemd() -> Iterator[Instance]:
    # The instance sees the host's root filesystem only, without /tmp and /run.
    root = os.stat("/").st_dev
    binds = [
        p
        for p in needed_paths()
        if os.stat(p).st_dev != root or under(p, ("/tmp", "/run", "/dev"))
    ]
    with booted("busd-test", bind_read_only=binds) as instance:
        sysusers = "/etc/sysusers.d/busd.conf"
        instance.install((UNIT_DIR / "busd.sysusers").read_text(), sysusers)
        instance.run("systemd-sysusers", sysusers)
        instance.install((UNIT_DIR / UNIT).read_text(), f"/etc/systemd/system/{UNIT}")
        instance.install(drop_in(), f"/etc/systemd/system/{UNIT}.d/test.conf")
        instance.install(config(), CONFIG_PATH)
        instance.systemctl("daemon-reload")
        yield instance


@pytest.fixture
def busd(systemd: Instance) -> Instance:
    """busd started (or still running from the test before)."""
    if systemd.props(UNIT, "ActiveState")["ActiveState"] != "active":
        systemd.install(config(), CONFIG_PATH)
        systemd.systemctl("start", UNIT)
    return systemd


def busctl(systemd: Instance, *args: str, check: bool = True) -> str:
    result = systemd.run(
        "env",
        f"PYTHONPATH={REPO}",
        str(VENV_BIN / "busctl"),
        "--socket",
        SOCKET,
        *args,
        check=check,
    )
    return result.stdout


def state(systemd: Instance) -> dict:
    """``busctl --json state``. It exits 3 while an instance that should run
    is not RUNNING (restarting after a kill, starting after a reload): the
    state is read all the same, and the callers look at the rows."""
    described = json.loads(busctl(systemd, "--json", "state", check=False))
    degraded = described["health"]["status"] == "degraded"
    assert degraded == any(r["state"] != "RUNNING" for r in instances(described))
    return described


def instances(described: dict) -> list[dict]:
    return described["brokers"]["orders"]["instances"]


def worker_pids(systemd: Instance) -> set[int]:
    """The workers' PIDs, by their process names (``orders:0``...)."""
    found = systemd.run("pgrep", "^orders:[0-9]+$", check=False).stdout.split()
    return {int(pid) for pid in found}


def fork_server_pids(systemd: Instance) -> set[int]:
    """The fork servers' PIDs, by process name: one while busd runs."""
    found = systemd.run("pgrep", "-x", "busd-forkserver", check=False).stdout.split()
    return {int(pid) for pid in found}


def all_running(systemd: Instance, count: int | None = None) -> dict | None:
    """busd's state once every orders instance runs (``count`` of them)."""
    described = state(systemd)
    rows = instances(described)
    ok = all(row["state"] == "RUNNING" for row in rows)
    return described if ok and (count is None or len(rows) == count) else None


def test_unit_files_verify_clean(systemd: Instance) -> None:
    # As shipped, with `busd` on systemd's search path (a tmpfs on
    # /usr/local/bin in a private mount namespace), without the drop-in;
    # then as installed here with the drop-in. Warnings count as failures.
    shipped = systemd.share / "shipped"
    shipped.mkdir(exist_ok=True)
    (shipped / UNIT).write_text((UNIT_DIR / UNIT).read_text())
    script = (
        "mount -t tmpfs tmpfs /usr/local/bin"
        " && mount -t tmpfs tmpfs /etc/systemd/system"
        f" && ln -s {VENV_BIN / 'busd'} /usr/local/bin/busd"
        f" && systemd-analyze verify --man=no /run/harness/shipped/{UNIT}"
    )
    for command in (
        ("unshare", "-m", "sh", "-c", script),
        ("systemd-analyze", "verify", "--man=no", UNIT),
    ):
        result = systemd.run(*command, check=False)
        assert (result.returncode, result.stderr) == (0, ""), result.stderr


def test_start_returns_once_busd_answers(systemd: Instance) -> None:
    if systemd.props(UNIT, "ActiveState")["ActiveState"] == "active":
        systemd.systemctl("stop", UNIT)
    systemd.systemctl("start", UNIT)
    # No waiting from here on: start returned only after READY=1, which busd
    # sends once its socket answers and every broker instance runs.
    props = systemd.props(UNIT, "ActiveState", "SubState", "MainPID", "StatusText")
    assert props["ActiveState"] == "active" and props["SubState"] == "running"
    assert props["StatusText"] == "Running"
    assert systemd.systemctl("is-active", UNIT).stdout.strip() == "active"
    described = state(systemd)
    assert described["state"] == "STARTED"
    assert described["pid"] == int(props["MainPID"])
    assert [row["state"] for row in instances(described)] == ["RUNNING"] * 2
    busd_user = systemd.run("id", "-u", "busd").stdout.strip()
    assert described["uid"] == int(busd_user), "User=busd from the unit"


def test_busctl_state_from_inside(busd: Instance) -> None:
    text = busctl(busd, "state")
    assert SOCKET in text and "orders:0" in text and "orders:1" in text
    listing = busd.run("stat", "-c", "%A %U:%G", SOCKET, "/run/busd/busd.pid").stdout
    assert listing.splitlines() == ["srw-rw---- busd:busd", "-rw-r--r-- busd:busd"]
    spool = busd.run("stat", "-c", "%U", "/var/lib/busd/busd.spool").stdout
    assert spool.strip() == "busd", "StateDirectory= is writable under ProtectSystem"


def test_hardening_applies_to_busd_and_its_workers(busd: Instance) -> None:
    main_pid = busd.props(UNIT, "MainPID")["MainPID"]
    worker = str(instances(state(busd))[0]["pid"])
    for pid in (main_pid, worker):
        status = busd.run("cat", f"/proc/{pid}/status").stdout
        fields = dict(line.split(":", 1) for line in status.splitlines())
        assert fields["NoNewPrivs"].strip() == "1"
        assert int(fields["CapEff"], 16) == int(fields["CapBnd"], 16) == 0
        assert fields["Seccomp"].strip() == "2", "SystemCallFilter="

        def mount(target: str, column: str, pid: str = pid) -> str:
            out = busd.run("findmnt", "--task", pid, "-no", column, "-T", target)
            return out.stdout.strip()

        for path in ("/", "/usr", "/etc"):
            assert mount(path, "OPTIONS").startswith("ro,"), f"{path}: ProtectSystem"
        assert mount("/run/busd", "OPTIONS").startswith("rw,")
        assert "systemd-private" in mount("/tmp", "SOURCE"), "PrivateTmp="
        assert mount("/root", "TARGET") == "/root", "ProtectHome="
        assert mount("/dev", "SOURCE") != mount("/dev", "SOURCE", "1"), "PrivateDevices"


def test_publish_reaches_the_broker_and_the_journal(busd: Instance) -> None:
    quantity = random.randrange(1000, 9999)
    busctl(busd, "publish", "main", f"BUY ABCD {quantity}")
    pids = {row["pid"] for row in instances(state(busd))}
    pattern = re.compile(rf"orders:\d\[(\d+)\] BUY order placed for {quantity} ABCD")
    match = wait_for(
        lambda: pattern.search(busd.journal(UNIT)), TIMEOUT, "the order in the journal"
    )
    assert int(match.group(1)) in pids


def test_watchdog_pings_keep_busd_alive(busd: Instance) -> None:
    names = ("WatchdogUSec", "WatchdogTimestampMonotonic", "NRestarts", "MainPID")
    before = busd.props(UNIT, *names)
    assert before["WatchdogUSec"] == f"{WATCHDOG_SEC}s"

    def pinged_twice() -> bool:
        now = busd.props(UNIT, *names)
        advance = int(now["WatchdogTimestampMonotonic"]) - int(
            before["WatchdogTimestampMonotonic"]
        )
        return advance >= WATCHDOG_SEC * 1_000_000 * 0.75

    wait_for(pinged_twice, 5 * WATCHDOG_SEC, "two WATCHDOG=1 pings")
    after = busd.props(UNIT, *names)
    assert (after["NRestarts"], after["MainPID"]) == (
        before["NRestarts"],
        before["MainPID"],
    )


def test_reload_applies_the_changed_config(busd: Instance) -> None:
    main_pid = busd.props(UNIT, "MainPID")["MainPID"]
    busd.install(config(instances=3), CONFIG_PATH)
    try:
        busd.systemctl("reload", UNIT)
        # systemd 252 finishes the reload job once `kill -HUP` returns; busd
        # then sends RELOADING=1 ... READY=1 on its own (see the report).
        wait_for(lambda: all_running(busd, 3), TIMEOUT, "3 running instances")
        wait_for(
            lambda: busd.props(UNIT, "ActiveState")["ActiveState"] == "active",
            TIMEOUT,
            "READY=1 after the reload",
        )
        assert busd.props(UNIT, "MainPID")["MainPID"] == main_pid
        assert f"Reloaded configuration from {CONFIG_PATH}" in busd.journal(UNIT)
    finally:
        busd.install(config(), CONFIG_PATH)
        busd.systemctl("reload", UNIT)
        wait_for(lambda: all_running(busd, 2), TIMEOUT, "back to 2 instances")


def test_broker_crash_is_logged_with_name_and_pid(busd: Instance) -> None:
    victim = instances(wait_for(lambda: all_running(busd), TIMEOUT, "running"))[0]
    busd.run("kill", "-KILL", str(victim["pid"]))
    line = f"orders:0 (PID {victim['pid']}): exited unexpectedly (killed by SIGKILL)"
    wait_for(lambda: line in busd.journal(UNIT), TIMEOUT, "the crash in the journal")

    def replaced() -> bool:
        described = all_running(busd)
        return bool(described) and instances(described)[0]["pid"] != victim["pid"]

    wait_for(replaced, TIMEOUT, "orders:0 running again")
    assert busd.props(UNIT, "ActiveState")["ActiveState"] == "active"


def test_sigkill_of_busd_makes_systemd_restart_it(busd: Instance) -> None:
    before = busd.props(UNIT, "MainPID", "NRestarts")
    described = state(busd)
    old_workers = {row["pid"] for row in instances(described)}
    assert worker_pids(busd) == old_workers
    assert fork_server_pids(busd) == {described["fork_server"]}
    busd.run("kill", "-KILL", before["MainPID"])

    def restarted() -> dict[str, str] | None:
        now = busd.props(UNIT, "MainPID", "NRestarts", "ActiveState", "SubState")
        changed = now["MainPID"] not in ("0", before["MainPID"])
        return now if changed and now["SubState"] == "running" else None

    now = wait_for(restarted, TIMEOUT, "a new busd, active")
    assert int(now["NRestarts"]) == int(before["NRestarts"]) + 1
    described = wait_for(lambda: all_running(busd, 2), TIMEOUT, "workers running")
    assert described["pid"] == int(now["MainPID"])
    new_workers = {row["pid"] for row in instances(described)}
    assert worker_pids(busd) == new_workers, "old workers left over"
    assert not new_workers & old_workers
    assert fork_server_pids(busd) == {described["fork_server"]}


def test_stop_leaves_no_process_and_no_socket(busd: Instance) -> None:
    cgroup = busd.props(UNIT, "ControlGroup")["ControlGroup"]
    assert cgroup == "/system.slice/busd.service"
    busd.systemctl("stop", UNIT)
    props = busd.props(UNIT, "ActiveState", "Result", "MainPID", "ControlGroup")
    assert props == {
        "ActiveState": "inactive",
        "Result": "success",
        "MainPID": "0",
        "ControlGroup": "",
    }
    assert busd.run("test", "-e", f"/sys/fs/cgroup{cgroup}", check=False).returncode
    assert worker_pids(busd) == set()
    assert fork_server_pids(busd) == set()
    assert busd.run("test", "-e", SOCKET, check=False).returncode == 1
    assert busd.run("test", "-e", "/run/busd", check=False).returncode == 1
    log = busd.journal(UNIT)
    assert "Bus EXITED" in log and "Traceback" not in log
