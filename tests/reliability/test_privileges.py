"""busd started as root with ``[busd] user = "nobody"``: busd and its workers.

The kernel's view (/proc/PID/status) is what counts, not busd's log line.

Here the interpreter lives under /root/.pyenv and /root is mode 0700, so a
process that became ``nobody`` could neither exec it nor import the stdlib
modules it loads lazily. The test does what systemd's ``ProtectHome=tmpfs``
with ``BindReadOnlyPaths=`` does: busd runs in a private mount namespace in
which /root is an empty tmpfs with only the interpreter's tree bound back,
read-only. The PID namespace is shared, so the test reads /proc directly.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    STARTUP_DEADLINE,
    answers,
    broker,
    busd_run,
    gone,
    records,
    wait_states,
)

from busctl.client import Client

pytestmark = pytest.mark.reliability

NOBODY = pwd.getpwnam("nobody")
PREFIX = Path(os.path.realpath(sys.executable)).parents[1]  # .../versions/3.11.7

# Run in the new mount namespace by `sh -c`; $1 is a scratch directory,
# "$@" after it busd's argv.
NAMESPACE = """
set -e
stash=$1; shift
mount --bind /root "$stash"
mount -t tmpfs -o mode=0755 tmpfs /root
mkdir -p "/root${PREFIX#/root}"
mount --bind "$stash${PREFIX#/root}" "/root${PREFIX#/root}"
mount -o remount,bind,ro "/root${PREFIX#/root}"
umount "$stash"
exec "$@"
"""


def status(pid: int) -> dict[str, str]:
    """The fields of /proc/PID/status."""
    with open(f"/proc/{pid}/status") as file:
        return dict(line.rstrip("\n").split(":\t", 1) for line in file)


def assert_runs_as_nobody(pid: int) -> None:
    fields = status(pid)
    uid, gid = NOBODY.pw_uid, NOBODY.pw_gid
    assert fields["Uid"].split() == [str(uid)] * 4, (pid, fields["Uid"])
    assert fields["Gid"].split() == [str(gid)] * 4, (pid, fields["Gid"])
    assert fields["Groups"].split() == [str(g) for g in os.getgrouplist("nobody", gid)]
    assert fields["CapEff"] == "0" * 16, (pid, fields["CapEff"])


@pytest.fixture
def scratch():
    """A directory nobody can traverse (pytest's tmp_path is root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="busd-privileges-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@contextlib.contextmanager
def busd_in_namespace(
    scratch: Path, config_text: str
) -> Iterator[tuple[subprocess.Popen[bytes], str, str, Path]]:
    """busd started as root in the mount namespace (module docstring), on a
    socket and PID file in a root-owned directory, once it answers.

    Yields busd's process, socket path, PID file path and log file; kills
    busd by its PID at the end if the test left it running.
    """
    assert os.geteuid() == 0, "starts busd as root"
    assert str(PREFIX).startswith("/root/"), PREFIX
    run = scratch / "run"  # like /run/busd: root's, so nobody can't write it
    run.mkdir(mode=0o755)
    stash = scratch / "stash"
    stash.mkdir()
    config = scratch / "busd.toml"
    config.write_text(config_text)
    config.chmod(0o644)
    socket_path, pidfile = str(run / "busd.sock"), str(run / "busd.pid")
    log = scratch / "busd.log"
    command = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        NAMESPACE,
        "namespace",
        str(stash),
        *busd_run(config, socket_path, pidfile),
    ]
    with open(log, "wb") as output:
        busd = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            env={**os.environ, "PREFIX": str(PREFIX)},
        )
    try:
        # unshare and sh exec into busd: the PID stays the same.
        deadline = time.monotonic() + STARTUP_DEADLINE
        while not answers(socket_path):
            assert busd.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)  # polling another process: no event to wait on
        yield busd, socket_path, pidfile, log
    finally:
        if busd.poll() is None:
            os.kill(busd.pid, signal.SIGKILL)
            busd.wait(10)


def records_dir(scratch: Path) -> Path:
    """A directory where workers running as nobody can write records."""
    spool = scratch / "records"
    spool.mkdir()
    os.chown(spool, NOBODY.pw_uid, NOBODY.pw_gid)
    return spool


def test_busd_and_its_workers_run_as_nobody_after_starting_as_root(scratch):
    record = records_dir(scratch) / "rec.jsonl"
    # "root" asks for more than busd, once nobody, can give: ignored, said.
    config = (
        '[busd]\nuser = "nobody"\n\n'
        + broker("rec", "brokers_for_tests:Recorder", record, instances=2)
        + broker("wants_root", "brokers_for_tests:Recorder", channels=("x",))
        + 'user = "root"\n'
    )
    with busd_in_namespace(scratch, config) as (busd, socket_path, pidfile, log):
        with Client(socket_path) as client:
            rows = wait_states(client, "rec", ["RUNNING"] * 2)
            rows += wait_states(client, "wants_root", ["RUNNING"])
            assert client.state()["pid"] == busd.pid
            fork_server = client.state()["fork_server"]
            client.call("publish", channel="main", message="as nobody", wait=True)
        workers = [row["pid"] for row in rows]
        # The fork server took busd's credentials before forking anyone.
        for pid in [busd.pid, fork_server, *workers]:
            assert_runs_as_nobody(pid)
        assert record.stat().st_uid == NOBODY.pw_uid  # written by a worker
        assert [r["message"] for r in records(record)] == ["as nobody"]
        os.kill(busd.pid, signal.SIGTERM)
        assert busd.wait(30) == 0, log.read_text()
    text = log.read_text()
    assert "Dropped privileges to uid=65534 gid=65534 groups=65534" in text, text
    # busd, now nobody, may not unlink in root's run directory: it says so.
    assert f"Cannot remove {socket_path}: Permission denied" in text, text
    assert (
        f"Could not remove PID file {pidfile} (Permission denied); "
        "leaving it behind, unlocked." in text
    ), text
    print("\n" + "\n".join(line for line in text.splitlines() if "WARNING" in line))
    assert all(gone(pid) for pid in [fork_server, *workers])
    assert (
        "Broker wants_root: user = 'root' is ignored: busd runs as uid 65534, "
        "not root, so its workers run as busd's user" in text
    ), text


def test_a_brokers_own_user_applies_to_its_workers_only(scratch):
    # busd stays root; one broker names a user, the other does not.
    spool = records_dir(scratch)
    as_nobody, as_root = spool / "nobody.jsonl", spool / "root.jsonl"
    config = broker(
        "low", "brokers_for_tests:Recorder", as_nobody, user="nobody"
    ) + broker("high", "brokers_for_tests:Recorder", as_root)
    with busd_in_namespace(scratch, config) as (busd, socket_path, _pidfile, log):
        with Client(socket_path) as client:
            low = wait_states(client, "low", ["RUNNING"])[0]["pid"]
            high = wait_states(client, "high", ["RUNNING"])[0]["pid"]
            result = client.call("publish", channel="main", message="hi", wait=True)
        assert (result["brokers"], result["acked"]) == (2, 2)
        assert_runs_as_nobody(low)
        assert status(high)["Uid"].split() == ["0"] * 4
        assert status(busd.pid)["Uid"].split() == ["0"] * 4
        assert as_nobody.stat().st_uid == NOBODY.pw_uid
        assert as_root.stat().st_uid == 0
        assert [r["message"] for r in records(as_nobody)] == ["hi"]
        assert [r["message"] for r in records(as_root)] == ["hi"]
        os.kill(busd.pid, signal.SIGTERM)
        assert busd.wait(30) == 0, log.read_text()
    assert all(gone(pid) for pid in (low, high))
