"""The fork server: busd's child that forks the workers (busd/forkserver.py).

Real busd, real fork server, real workers: who is whose parent (busd
adopts every worker the server forks), what a forked worker sees (its
directory, environment, import path, session, name), what happens when the
fork server is killed (nothing, to the workers), and that it ends with busd.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
from helpers import broker, busd_run, gone, rows, wait_for, wait_states

from busd.spawner import ORPHAN_MARK

DEADLINE = 20.0

# A handler in the broker's own directory: it writes what its process sees.
FACTS_HANDLER = textwrap.dedent(
    """
    import json, os, sys

    class Facts:
        def __init__(self, bus):
            facts = {
                "cwd": os.getcwd(),
                "path0": sys.path[0],
                "module": __file__,
                "env": os.environ.get("FACT_VAR"),
                "busd_pid": os.environ.get("BUSD_PID"),
                "pid": os.getpid(),
                "sid": os.getsid(0),
                "ppid": os.getppid(),
                "umask": os.umask(0o022),
                "argv": sys.argv[1:],
                "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
            }
            with open(os.environ["FACTS"], "a") as out:
                out.write(json.dumps(facts) + "\\n")
    """
)


def test_workers_are_forked_by_busds_fork_server_which_ends_with_busd(start_busd):
    daemon = start_busd(
        config_text=broker("rec", "brokers_for_tests:Recorder", instances=2)
    )
    with daemon.client() as client:
        pids = [r["pid"] for r in wait_states(client, "rec", ["RUNNING"] * 2)]
        server = client.state()["fork_server"]
    # busd -> fork server, and busd -> workers: the server forks them and
    # busd adopts them at once. Each is named in ps/top by its instance.
    children = sorted(p.pid for p in psutil.Process(daemon.pid).children())
    assert children == sorted([server, *pids])
    assert psutil.Process(server).children() == []
    assert psutil.Process(server).name() == "busd-forkserver"
    assert sorted(psutil.Process(p).name() for p in pids) == ["rec:0", "rec:1"]
    shown = subprocess.run(
        [sys.executable, "-m", "busctl", "--socket", daemon.socket, "state"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"fork server PID {server}" in shown
    assert daemon.stop() == 0
    for pid in [server, *pids]:
        assert gone(pid), pid
    assert "did not exit" not in daemon.log_text()


def test_a_forked_worker_has_its_brokers_directory_environment_and_path(
    start_busd, tmp_path
):
    home = tmp_path / "home"
    home.mkdir()
    (home / "facts_handler.py").write_text(FACTS_HANDLER)
    facts_file = tmp_path / "facts.jsonl"
    config = (
        '[busd]\numask = "027"\n\n'
        "[brokers.facts]\n"
        'handler = "facts_handler:Facts"\n'
        f'cwd = "{home}"\n'
        f'env = {{ FACT_VAR = "from the config", FACTS = "{facts_file}" }}\n'
    )
    daemon = start_busd(config_text=config)
    with daemon.client() as client:
        [row] = wait_states(client, "facts", ["RUNNING"])
        server = client.state()["fork_server"]
    facts = json.loads(facts_file.read_text().splitlines()[-1])
    assert facts["pid"] == row["pid"]
    assert facts["cwd"] == str(home)
    # The broker's directory comes first on the import path, as for a script.
    assert (facts["path0"], facts["module"]) == (
        str(home),
        str(home / "facts_handler.py"),
    )
    assert facts["env"] == "from the config"
    assert facts["busd_pid"] == str(daemon.pid)
    # Its own session; busd is its parent (not the fork server); busd's umask.
    assert (facts["sid"], facts["ppid"]) == (row["pid"], daemon.pid)
    assert server != daemon.pid
    assert facts["umask"] == 0o027
    assert facts["argv"] == [
        "--broker",
        "facts",
        "--instance",
        "0",
        "--handler",
        "facts_handler:Facts",
    ]
    # Nothing of busd's or the fork server's: its three pipes, and what the
    # worker opened itself (a wake-up pipe, the protocol's copy of stdout).
    assert facts["fds"][:3] == [0, 1, 2]
    held = {
        os.readlink(f"/proc/{row['pid']}/fd/{fd}")
        for fd in facts["fds"][3:]
        if os.path.exists(f"/proc/{row['pid']}/fd/{fd}")
    }
    assert all(target.startswith("pipe:") for target in held), held
    assert daemon.stop() == 0


def test_a_killed_fork_server_leaves_the_workers_running_and_counts_against_none(
    start_busd,
):
    # One fault, one victim: the fork server's death is its own. The
    # workers (busd's children) run on with the same PIDs, no instance is
    # charged anything, and the next start is forked by a new server.
    daemon = start_busd(
        config_text=broker("rec", "brokers_for_tests:Recorder", instances=2)
        + broker("other", "brokers_for_tests:Recorder", channels=("other",))
    )
    with daemon.client() as client:
        before = client.state()
        server = before["fork_server"]
        old = [r["pid"] for r in wait_states(client, "rec", ["RUNNING"] * 2)]
        [other] = wait_states(client, "other", ["RUNNING"])
        os.kill(server, signal.SIGKILL)
        wait_for(lambda: gone(server), DEADLINE, "the fork server gone")

        def new_server() -> int | None:
            pid = client.state()["fork_server"]
            return pid if pid not in (None, server) else None

        replacement = wait_for(new_server, DEADLINE, "a new fork server")
        assert psutil.Process(replacement).ppid() == daemon.pid
        after = client.state()
        for name in ("rec", "other"):
            for row in after["brokers"][name]["instances"]:
                assert row["state"] == "RUNNING", row
                assert (row["restarts"], row["last_exit"]) == (0, None), row
        assert [r["pid"] for r in rows(client, "rec")] == old
        assert rows(client, "other")[0]["pid"] == other["pid"]
        assert all(psutil.Process(p).ppid() == daemon.pid for p in old)
        health = after["fork_server_health"]
        assert health["restarts"] == 1, health
        assert health["last_exit"] == "killed by SIGKILL", health
        result = client.call("publish", channel="main", message="after", wait=True)
        assert (result["acked"], result["dead"]) == (1, 0)
        # A later start is forked by the new server (and adopted by busd).
        client.broker_restart("rec", 0)
        fresh = wait_states(client, "rec", ["RUNNING"] * 2)[0]["pid"]
        assert fresh != old[0]
        assert psutil.Process(fresh).ppid() == daemon.pid
    log = daemon.log_text()
    assert log.count(f"The fork server (PID {server}) died (killed by SIGKILL)") == 1
    assert "exited unexpectedly" not in log, log
    assert daemon.stop() == 0
    assert gone(replacement) and all(gone(p) for p in [fresh, *old])


def test_a_fork_server_that_keeps_dying_is_restarted_with_a_growing_back_off(
    start_busd,
):
    daemon = start_busd(config_text=broker("rec", "brokers_for_tests:Recorder"))
    with daemon.client() as client:
        [row] = wait_states(client, "rec", ["RUNNING"])
        killed = []
        for _ in range(3):
            server = client.state()["fork_server"]
            os.kill(server, signal.SIGKILL)
            killed.append(server)

            def replaced() -> int | None:
                pid = client.state()["fork_server"]
                return pid if pid not in (None, *killed) else None

            wait_for(replaced, DEADLINE, "a new fork server")
        health = client.state()["fork_server_health"]
        assert (health["restarts"], health["last_exit"]) == (3, "killed by SIGKILL")
        assert health["pid"] == client.state()["fork_server"]
        # The worker was never touched, and nothing was charged to it.
        [now] = rows(client, "rec")
        assert (now["state"], now["pid"], now["restarts"]) == ("RUNNING", row["pid"], 0)
    log = daemon.log_text()
    # One line per death, with its PID; the delays double (0.1, 0.2, 0.4 s).
    for server, delay in zip(killed, ("0.1", "0.2", "0.4"), strict=True):
        line = f"The fork server (PID {server}) died (killed by SIGKILL)"
        assert log.count(line) == 1, log
        assert f"a new one starts in {delay} s" in log.split(line)[1].split("\n")[0]
    assert "The fork server is back" in log and "(restart 3)" in log
    assert daemon.stop() == 0


def test_busd_collects_the_processes_its_workers_leave_behind(start_busd, tmp_path):
    # busd is a child subreaper: a process a worker started and left (its
    # parent exited) becomes busd's child, and busd reaps it when it ends.
    (tmp_path / "leaver.py").write_text(
        textwrap.dedent(
            """
            import os, time

            class Leaver:
                def __init__(self, bus):
                    bus.subscribe("main", self.leave)

                def leave(self, message):
                    child = os.fork()
                    if child == 0:
                        if os.fork() == 0:
                            time.sleep(0.2)
                            os._exit(5)
                        os._exit(0)
                    os.waitpid(child, 0)
            """
        )
    )
    config = f'[brokers.leaver]\nhandler = "leaver:Leaver"\ncwd = "{tmp_path}"\n'
    daemon = start_busd(config_text=config)
    before = {p.pid for p in psutil.Process(daemon.pid).children()}
    with daemon.client() as client:
        wait_states(client, "leaver", ["RUNNING"])
        result = client.call("publish", channel="main", message="go", wait=True)
        assert result["acked"] == 1

        def left_behind() -> list[int]:
            return [
                p.pid
                for p in psutil.Process(daemon.pid).children()
                if p.pid not in before
                and p.pid != client.state()["fork_server"]
                and p.pid not in {r["pid"] for r in rows(client, "leaver")}
            ]

        # It is busd's child (alive, or a zombie until busd collects it).
        [stray] = wait_for(left_behind, DEADLINE, "the left process under busd")

        def collected() -> bool:
            return not psutil.pid_exists(stray)

        wait_for(collected, DEADLINE, "busd to collect it")
    assert f"Collected PID {stray}, a process left to busd (exit 5)" in (
        daemon.log_text()
    )
    assert daemon.stop() == 0


def test_a_missing_broker_directory_is_reported_and_the_instance_fails(
    start_busd, tmp_path
):
    missing = tmp_path / "nowhere"
    config = (
        f'[brokers.lost]\nhandler = "brokers_for_tests:Recorder"\ncwd = "{missing}"\n'
        "start_retries = 2\n"  # FATAL after 3 failed starts, not retried for ever
    )
    daemon = start_busd(config_text=config)
    with daemon.client() as client:
        wait_states(client, "lost", ["FATAL"])
    log = daemon.log_text()
    assert f"error: cannot change to directory '{missing}'" in log, log
    assert daemon.stop() == 0


def test_the_fork_server_refuses_a_command_line_of_its_own():
    result = subprocess.run(
        [sys.executable, "-m", "busd.forkserver"],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert result.returncode == 2
    assert "usage: python -m busd.forkserver FD" in result.stderr


def test_busd_run_with_a_broken_config_leaves_no_fork_server(tmp_path):
    config = tmp_path / "busd.toml"
    config.write_text(
        '[brokers.rec]\nhandler = "brokers_for_tests:Recorder"\nuser = "no-such-user"\n'
    )
    socket_path = str(tmp_path / "busd.sock")
    run = subprocess.run(
        busd_run(config, socket_path, str(tmp_path / "busd.pid")),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert run.returncode == 78, run.stderr
    assert "no-such-user" in run.stderr
    # Only this busd's: other checkouts' tests may run fork servers meanwhile.
    assert fork_servers_of(socket_path) == []


def fork_servers_of(socket_path: str) -> list[int]:
    """PIDs of the fork servers started by the busd of ``socket_path``."""
    pids = []
    for process in psutil.process_iter():
        try:
            if (
                process.name() == "busd-forkserver"
                and process.environ().get(ORPHAN_MARK) == socket_path
            ):
                pids.append(process.pid)
        except psutil.Error:
            pass  # gone meanwhile, or not ours to read
    return pids


def test_without_brokers_there_is_no_fork_server_until_a_reload_adds_one(
    start_busd,
):
    daemon = start_busd()
    with daemon.client() as client:
        assert client.state()["fork_server"] is None
        assert psutil.Process(daemon.pid).children() == []
        daemon.config.write_text(broker("rec", "brokers_for_tests:Recorder"))
        client.reload()  # carried out on busd's main thread, soon
        wait_for(lambda: "rec" in client.state()["brokers"], DEADLINE, "reload")
        [row] = wait_states(client, "rec", ["RUNNING"])
        server = client.state()["fork_server"]
        assert psutil.Process(row["pid"]).ppid() == daemon.pid
        assert psutil.Process(server).ppid() == daemon.pid
        result = client.call("publish", channel="main", message="x", wait=True)
        assert result["acked"] == 1
    assert daemon.stop() == 0
    assert gone(server) and gone(row["pid"])


def test_a_daemonized_busd_starts_its_fork_server_after_the_fork(tmp_path):
    # `busd start` forks away from this process: a fork server started
    # before that fork would be left behind, with the wrong parent.
    config = tmp_path / "busd.toml"
    config.write_text(broker("rec", "brokers_for_tests:Recorder", instances=2))
    socket_path, pidfile = str(tmp_path / "busd.sock"), str(tmp_path / "busd.pid")
    started = subprocess.run(
        [
            *(sys.executable, "-m", "busd", "start", "--config", str(config)),
            *("--socket", socket_path, "--pidfile", pidfile),
            *("--log-file", str(tmp_path / "busd.log")),
        ],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert started.returncode == 0, started.stderr
    pid = int(Path(pidfile).read_text())
    try:
        from busctl import Client

        with Client(socket_path) as client:
            rows_ = wait_states(client, "rec", ["RUNNING"] * 2)
            server = client.state()["fork_server"]
        assert psutil.Process(server).ppid() == pid
        # The daemon (not the process `busd start` ran as) adopted them.
        assert {psutil.Process(r["pid"]).ppid() for r in rows_} == {pid}
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: gone(pid), DEADLINE, "the daemonized busd to exit")
    wait_for(lambda: gone(server), DEADLINE, "its fork server to exit")


def test_the_fork_server_survives_bad_requests_and_ends_when_busd_closes():
    # The server on its own, driven as busd drives it (busd/spawner.py). Like
    # busd, this process is a child subreaper meanwhile: the worker is handed
    # over to it, with a pidfd, and it collects the worker's exit itself.
    import socket

    import msgpack

    from busd.spawner import exit_code, server_environment
    from busd.subreaper import PR_SET_CHILD_SUBREAPER, become_subreaper

    become_subreaper()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.settimeout(DEADLINE)
    server = subprocess.Popen(
        [sys.executable, "-m", "busd.forkserver", str(theirs.fileno())],
        pass_fds=[theirs.fileno()],
        env=server_environment("/nonexistent/busd.sock"),
        stderr=subprocess.PIPE,
        text=True,
    )
    theirs.close()
    pipes = [os.pipe() for _ in range(3)]
    # The worker's ends go to the server; ours stay here.
    worker_ends = [pipes[0][0], pipes[1][1], pipes[2][1]]
    our_ends = [pipes[0][1], pipes[1][0], pipes[2][0]]
    pidfds: list[int] = []
    try:
        ours.send(msgpack.packb({"op": "spawn"}))  # no tag: fails in the server
        ours.send(msgpack.packb({"op": "no-such-op"}))
        request = {
            "op": "spawn",
            "tag": 7,
            "argv": ["--exec", "--", sys.executable, "-c", "raise SystemExit(3)"],
            "env": dict(os.environ),
            "cwd": "/",
            "owner": None,
            "name": "probe:0",
        }
        socket.send_fds(ours, [msgpack.packb(request)], worker_ends)
        data, pidfds, _, _ = socket.recv_fds(ours, 1 << 16, 1)
        spawned = msgpack.unpackb(data)
        assert spawned["op"] == "spawned" and spawned["tag"] == 7, spawned
        assert len(pidfds) == 1
        # Ours to reap, and only ours: the server reports no exit any more.
        result = os.waitid(os.P_PIDFD, pidfds[0], os.WEXITED)
        assert (result.si_pid, exit_code(result)) == (spawned["pid"], 3)
    finally:
        ours.close()  # as busd does on its way out: the server ends
        status = server.wait(DEADLINE)
        for fd in worker_ends + our_ends + pidfds:
            os.close(fd)
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    assert status == 0
    errors = server.stderr.read()
    assert "busd fork server: request failed:" in errors, errors
    assert "busd fork server: unknown request 'no-such-op'" in errors, errors


def test_a_worker_that_busd_does_not_adopt_exits_at_once():
    # Driven as busd drives the server, by a process that is no child
    # subreaper: the worker is re-parented elsewhere (init), so it must not
    # run, and must not wait for its new parent either (it once waited for
    # init to die). Its pidfd says when it has exited, child or not.
    import select
    import socket

    import msgpack

    from busd.spawner import server_environment

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.settimeout(DEADLINE)
    server = subprocess.Popen(
        [sys.executable, "-m", "busd.forkserver", str(theirs.fileno())],
        pass_fds=[theirs.fileno()],
        env=server_environment("/nonexistent/busd.sock"),
    )
    theirs.close()
    pipes = [os.pipe() for _ in range(3)]
    worker_ends = [pipes[0][0], pipes[1][1], pipes[2][1]]
    our_ends = [pipes[0][1], pipes[1][0], pipes[2][0]]
    pidfds: list[int] = []
    try:
        request = {
            "op": "spawn",
            "tag": 1,
            "argv": [
                "--exec",
                "--",
                sys.executable,
                "-c",
                "import time; time.sleep(60)",
            ],
            "env": dict(os.environ),
            "cwd": "/",
            "owner": None,
            "name": "stray:0",
        }
        socket.send_fds(ours, [msgpack.packb(request)], worker_ends)
        data, pidfds, _, _ = socket.recv_fds(ours, 1 << 16, 1)
        spawned = msgpack.unpackb(data)
        assert spawned["tag"] == 1 and len(pidfds) == 1, spawned
        readable, _, _ = select.select(pidfds, [], [], DEADLINE)
        assert readable, f"worker {spawned['pid']} still runs, not busd's child"
    finally:
        ours.close()
        server.wait(DEADLINE)
        for fd in worker_ends + our_ends + pidfds:
            os.close(fd)


def test_a_spawn_that_cannot_reach_the_server_marks_it_gone_at_once():
    # A send that fails (the server's end is closed) is the server's death:
    # the spawner says so at once, so a retry waits for the next server
    # instead of trying the dead one again (it once spun busd's loop).
    import asyncio
    import socket

    from busd.spawner import ForkServerGone, Spawner

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.close()
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    spawner = Spawner(process, ours)
    lost: list[Spawner] = []

    async def scenario() -> None:
        spawner.attach(asyncio.get_running_loop(), on_lost=lost.append)
        try:
            await spawner.spawn(["--handler", "x:Y"], {}, "/", None, "x:0")
        except ForkServerGone as error:
            assert "cannot reach the fork server" in str(error)
        else:
            raise AssertionError("the spawn did not fail")
        assert spawner.gone
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while not lost and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)

    try:
        asyncio.run(scenario())
    finally:
        process.wait(DEADLINE)
    assert lost == [spawner] and spawner.returncode == 0
