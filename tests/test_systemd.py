"""systemd/busd.service in a real systemd: start, reload, crash, restart, stop;
then with systemd/busd.socket: busd started by its first client.

Throw-away systemd instances (tests/systemd_harness.py): one with
busd.service alone, one with busd.socket beside it. In each: the busd user
from systemd/busd.sysusers, the units exactly as shipped, a config with the
``orders`` broker, and one drop-in that only points ExecStart= at this
checkout (and shows this machine's interpreter through ProtectHome=, see
:func:`drop_in`). Everything else, the dedicated user and every hardening
option included, is what an installation gets.
"""

from __future__ import annotations

import contextlib
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

from busd.control.activation import ACTIVATION_ENVIRONMENT

REPO = Path(__file__).resolve().parent.parent
UNIT_DIR = REPO / "systemd"
VENV_BIN = Path(sys.executable).parent
UNIT = "busd.service"
SOCKET_UNIT = "busd.socket"
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


@contextlib.contextmanager
def installed(*units: str) -> Iterator[Instance]:
    """A booted instance with the busd user, ``units`` as shipped, the
    drop-in and the config."""
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
        for unit in units:
            text = (UNIT_DIR / unit).read_text()
            instance.install(text, f"/etc/systemd/system/{unit}")
        instance.install(drop_in(), f"/etc/systemd/system/{UNIT}.d/test.conf")
        instance.install(config(), CONFIG_PATH)
        instance.systemctl("daemon-reload")
        yield instance


@pytest.fixture(scope="module")
def systemd() -> Iterator[Instance]:
    """busd.service alone: busd binds its socket itself."""
    with installed(UNIT) as instance:
        yield instance


@pytest.fixture(scope="module")
def activated() -> Iterator[Instance]:
    """busd.service and busd.socket: systemd holds the socket."""
    with installed(UNIT, SOCKET_UNIT) as instance:
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


def verify_shipped(systemd: Instance, *units: str) -> None:
    """``systemd-analyze verify`` of ``units`` as shipped, with `busd` on
    systemd's search path (a tmpfs on /usr/local/bin in a private mount
    namespace), without the drop-in. Warnings count as failures."""
    shipped = systemd.share / "shipped"
    shipped.mkdir(exist_ok=True)
    for unit in units:
        (shipped / unit).write_text((UNIT_DIR / unit).read_text())
    script = (
        "mount -t tmpfs tmpfs /usr/local/bin"
        " && mount -t tmpfs tmpfs /etc/systemd/system"
        f" && ln -s {VENV_BIN / 'busd'} /usr/local/bin/busd"
        " && systemd-analyze verify --man=no"
        + "".join(f" /run/harness/shipped/{unit}" for unit in units)
    )
    result = systemd.run("unshare", "-m", "sh", "-c", script, check=False)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


def verify_installed(systemd: Instance, *units: str) -> None:
    """``systemd-analyze verify`` of ``units`` as installed here (drop-in too)."""
    result = systemd.run("systemd-analyze", "verify", "--man=no", *units, check=False)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


def test_unit_files_verify_clean(systemd: Instance) -> None:
    # busd.service alone (its Wants=busd.socket finds no unit: no warning),
    # then with busd.socket beside it.
    verify_shipped(systemd, UNIT)
    verify_installed(systemd, UNIT)
    verify_shipped(systemd, UNIT, SOCKET_UNIT)


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
    # RuntimeDirectoryPreserve=yes keeps /run/busd (for busd.socket's file);
    # busd removed what it made there: its socket and PID file.
    assert busd.run("ls", "-A", "/run/busd").stdout == ""
    log = busd.journal(UNIT)
    assert "Bus EXITED" in log and "Traceback" not in log


# -- with busd.socket: systemd holds the socket, busd starts at the first call --------


def activation_variables(systemd: Instance, pid: int) -> set[str]:
    """The LISTEN_* variables in the environment of process ``pid``."""
    environ = systemd.run("cat", f"/proc/{pid}/environ").stdout.split("\0")
    names = {entry.split("=", 1)[0] for entry in environ if entry}
    return names & set(ACTIVATION_ENVIRONMENT)


def test_the_first_call_starts_busd_through_the_socket(activated: Instance) -> None:
    activated.systemctl("start", SOCKET_UNIT)
    socket_props = activated.props(SOCKET_UNIT, "ActiveState", "SubState")
    assert socket_props == {"ActiveState": "active", "SubState": "listening"}
    assert activated.props(UNIT, "ActiveState")["ActiveState"] == "inactive"
    assert worker_pids(activated) == set(), "busd not running yet"
    listing = activated.run("stat", "-c", "%A %U:%G", SOCKET).stdout
    assert listing == "srw-rw---- busd:busd\n", "SocketUser/Group/Mode="

    # The first client's connection waits in systemd's socket until busd,
    # started for it, accepts it and answers.
    assert busctl(activated, "ping").strip().startswith("pong")
    props = activated.props(UNIT, "ActiveState", "MainPID")
    described = wait_for(lambda: all_running(activated, 2), TIMEOUT, "workers")
    assert described["pid"] == int(props["MainPID"]) > 0
    assert described["socket"] == SOCKET
    journal = activated.journal(UNIT)
    assert f"Control socket from systemd: fd 3 (control), {SOCKET}" in journal
    # Systemd's LISTEN_* reached busd only: not the fork server, not a worker.
    children = {described["fork_server"], *(r["pid"] for r in instances(described))}
    assert children == fork_server_pids(activated) | worker_pids(activated)
    for pid in children:
        assert activation_variables(activated, pid) == set(), f"PID {pid}"
    wait_for(
        lambda: activated.props(UNIT, "ActiveState")["ActiveState"] == "active",
        TIMEOUT,
        "READY=1",
    )


def test_stop_leaves_the_socket_listening_for_the_next_call(
    activated: Instance,
) -> None:
    if activated.props(UNIT, "ActiveState")["ActiveState"] != "active":
        activated.systemctl("start", SOCKET_UNIT)
        busctl(activated, "ping")
    before = wait_for(lambda: all_running(activated, 2), TIMEOUT, "busd running")

    activated.systemctl("stop", UNIT)
    props = activated.props(UNIT, "ActiveState", "MainPID", "Result")
    assert props == {"ActiveState": "inactive", "MainPID": "0", "Result": "success"}
    assert worker_pids(activated) == set() and fork_server_pids(activated) == set()
    socket_props = activated.props(SOCKET_UNIT, "ActiveState", "SubState")
    assert socket_props == {"ActiveState": "active", "SubState": "listening"}
    assert activated.run("test", "-S", SOCKET, check=False).returncode == 0

    # The next call starts a new busd, on the same socket.
    described = json.loads(busctl(activated, "--json", "state"))
    assert described["pid"] not in (0, before["pid"])
    wait_for(
        lambda: activated.props(UNIT, "MainPID")["MainPID"] == str(described["pid"]),
        TIMEOUT,
        "the new busd as the unit's MainPID",
    )
    wait_for(lambda: all_running(activated, 2), TIMEOUT, "workers running again")
    assert "Traceback" not in activated.journal(UNIT)


def test_the_service_started_alone_pulls_in_the_socket(activated: Instance) -> None:
    # Wants=busd.socket: `systemctl start busd` with busd.socket installed
    # starts the socket first and busd is given it, as when activated.
    for unit in (UNIT, SOCKET_UNIT):
        activated.systemctl("stop", unit)
    activated.systemctl("start", UNIT)
    socket_props = activated.props(SOCKET_UNIT, "ActiveState", "SubState")
    assert socket_props["ActiveState"] == "active"
    main_pid = activated.props(UNIT, "MainPID")["MainPID"]
    line = f"busd[{main_pid}]: Control socket from systemd: fd 3 (control)"
    assert line in activated.run("journalctl", "--no-pager", "-u", UNIT).stdout
    verify_installed(activated, UNIT, SOCKET_UNIT)


def test_a_killed_busd_is_replaced_on_the_same_socket(activated: Instance) -> None:
    if activated.props(UNIT, "ActiveState")["ActiveState"] != "active":
        activated.systemctl("start", UNIT)
    before = wait_for(lambda: all_running(activated, 2), TIMEOUT, "busd running")
    inode = activated.run("stat", "-c", "%i", SOCKET).stdout
    activated.run("kill", "-KILL", str(before["pid"]))
    wait_for(
        lambda: activated.props(UNIT, "MainPID")["MainPID"] != str(before["pid"]),
        TIMEOUT,
        "systemd to see busd die",
    )
    # Sent while no busd runs: the socket is systemd's, so the request waits
    # in its queue and the next busd answers it.
    described = json.loads(busctl(activated, "--json", "state"))
    assert described["pid"] not in (0, before["pid"])
    assert activated.run("stat", "-c", "%i", SOCKET).stdout == inode
    wait_for(lambda: all_running(activated, 2), TIMEOUT, "workers running again")
