"""What workers can't see of busd, and two busd racing for one PID file."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from helpers import broker, busd_run, rows, wait_for

pytestmark = pytest.mark.reliability


def descriptors(pid: int) -> dict[int, str]:
    """``fd -> what it points at`` for a process, from /proc."""
    found = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue  # closed meanwhile
    return found


def socket_inode(pid: int, path: str) -> str | None:
    """The ``socket:[inode]`` of busd's listening socket at ``path``."""
    with open("/proc/net/unix") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            # Flags 00010000: the listening socket, not a connection to it.
            if len(fields) >= 8 and fields[7] == path and fields[3] == "00010000":
                return f"socket:[{fields[6]}]"
    return None


def test_workers_inherit_neither_the_control_socket_nor_the_spool(start_busd, tmp_path):
    spool = tmp_path / "spool"
    daemon = start_busd(
        f'[busd]\nspool = "{spool}"\n\n'
        + broker("orders", "brokers_for_tests:Recorder", instances=2)
    )
    listening = socket_inode(daemon.pid, daemon.socket)
    assert listening is not None
    assert listening in descriptors(daemon.pid).values()  # busd holds them...
    assert str(spool / "busd.spool") in descriptors(daemon.pid).values()
    with daemon.client() as client:
        pids = [row["pid"] for row in rows(client, "orders")]
    for pid in pids:
        held = descriptors(pid)
        # ...its workers hold their three pipes and their own files only.
        assert listening not in held.values(), held
        assert not any("busd.spool" in target for target in held.values()), held
        assert not any(target.endswith("busd.pid") for target in held.values()), held
        assert {0, 1, 2} <= set(held)
    assert daemon.stop() == 0


def test_message_contents_never_reach_a_shell(start_busd, tmp_path):
    marker = tmp_path / "pwned"
    record = tmp_path / "record.jsonl"
    daemon = start_busd(broker("orders", "brokers_for_tests:Recorder", record))
    hostile = f"$(touch {marker}); `touch {marker}` ; touch {marker} #"
    with daemon.client() as client:
        client.call("publish", channel="main", message=hostile, wait=True)
    wait_for(lambda: record.exists() and hostile in record.read_text())
    assert not marker.exists()
    # No code path of busd or busctl hands anything to a shell at all.
    root = Path(__file__).resolve().parents[2]
    for package in ("busd", "busctl"):
        for source in (root / package).rglob("*.py"):
            text = source.read_text()
            assert "shell=True" not in text, source
            assert "os.system(" not in text, source
            assert "os.popen(" not in text, source
    assert daemon.stop() == 0


def test_two_busd_started_at_once_exactly_one_runs(tmp_path):
    config = tmp_path / "busd.toml"
    config.write_text("")
    pidfile = str(tmp_path / "busd.pid")
    racers = [
        subprocess.Popen(
            busd_run(config, str(tmp_path / f"{i}.sock"), pidfile),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    try:
        # The loser exits by itself; the winner keeps running.
        wait_for(
            lambda: sum(r.poll() is not None for r in racers) == 1,
            timeout=30,
            what="one of the two busd to give up",
        )
        loser = next(r for r in racers if r.poll() is not None)
        winner = next(r for r in racers if r.poll() is None)
        output = loser.stdout.read().decode()
        assert loser.returncode != 0
        # One line from busd run's check, or, when both passed it at the
        # same instant, the PID file's own refusal: the lock decides.
        assert re.search(rf"already running[:,] PID {winner.pid}\b", output), output
        assert Path(pidfile).read_text().strip() == str(winner.pid)
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.terminate()
                racer.wait(15)
            racer.stdout.close()
    assert winner.returncode == 0
