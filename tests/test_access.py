"""Access control with a client that really is another user.

The client side runs in a forked child that drops to ``nobody``, or to a
bare uid no user database knows (setgroups, setgid, setuid), before it
touches the socket, so busd learns its uid and
groups from the kernel (SO_PEERCRED, SO_PEERGROUPS) exactly as it would
for a stranger's process. The child uses ``busctl.Client`` and
``busctl.cli.main`` (imported here, before the fork: nobody may not be able
to read the interpreter's files) and reports through a pipe as JSON.

The sockets live under a world-traversable temporary directory, so that
when nobody is kept out it is by the socket's mode and busd's allow-lists,
never by a parent directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import shutil
import signal
import stat
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import RunningDaemon, wait_for

import busctl.cli
import busctl.render  # the CLI loads it lazily: load it here, as root
from busctl.client import BusError, Client
from busd.protocol import PROTOCOL_VERSION

NOBODY = 65534
NOGROUP = 65534
CHILD_DEADLINE = 20.0


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """Like pytest's ``tmp_path`` (which ``start_busd`` uses), but reachable.

    pytest's own temporary root is mode 0700; nobody could not even reach
    a socket there.
    """
    directory = Path(tempfile.mkdtemp(prefix="busd-access-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


def as_nobody(work: Callable[[], Any]) -> dict[str, Any]:
    """Run ``work()`` in a child forked as nobody; its result and the child's PID.

    The child never returns into pytest: it writes ``{"pid", "result"}`` (or
    ``{"pid", "error"}``) to a pipe and leaves with ``os._exit``.
    """
    return finish(fork_as(work, NOBODY, NOGROUP))


def fork_as(
    work: Callable[[], Any], uid: int, gid: int, groups: tuple[int, ...] = ()
) -> tuple[int, int]:
    """Fork a child that becomes ``uid``/``gid``/``groups`` and runs ``work()``.

    Returns its PID and the read end of its report pipe, for ``finish``.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        status = 1
        try:
            os.close(read_end)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            try:
                report = {"result": work()}
            except BaseException:
                report = {"error": traceback.format_exc()}
            report["pid"] = os.getpid()
            os.write(write_end, json.dumps(report).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    return pid, read_end


def finish(child: tuple[int, int]) -> dict[str, Any]:
    """Wait (with a deadline) for a child of ``fork_as``; return its report."""
    pid, read_end = child
    try:
        wait_for(
            lambda: os.waitpid(pid, os.WNOHANG)[0] == pid,
            timeout=CHILD_DEADLINE,
            what=f"the child {pid} running as another user",
        )
    except AssertionError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
        raise
    with os.fdopen(read_end, "rb") as pipe:
        report = json.loads(pipe.read() or b"{}")
    assert "error" not in report, report["error"]
    assert "result" in report, "the child reported nothing"
    return report


def calls(path: str, *ops: str) -> Callable[[], dict[str, Any]]:
    """Work for ``as_nobody``: run each op on one connection, note the answers."""

    def work() -> dict[str, Any]:
        answers: dict[str, Any] = {"ids": [os.getuid(), os.getgid(), os.getgroups()]}
        try:
            client = Client(path, timeout=5)
        except BusError as error:
            return {**answers, "connect": [error.code, error.message]}
        with client:
            for op in ops:
                arguments = {"channel": "main", "message": "from nobody"}
                try:
                    result = client.call(op, **(arguments if op == "publish" else {}))
                    answers[op] = ["ok", result]
                except BusError as error:
                    answers[op] = [error.code, error.message]
        return answers

    return work


def command(*argv: str) -> Callable[[], dict[str, Any]]:
    """Work for ``as_nobody``: the busctl command line, in the child."""

    def work() -> dict[str, Any]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = busctl.cli.main(list(argv))
        return {"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()}

    return work


def start(start_busd: Callable[..., RunningDaemon], config: str) -> RunningDaemon:
    daemon = start_busd(config_text=config)
    daemon.directory.chmod(0o755)  # the socket's own mode decides, not this
    return daemon


def refused_in_log(daemon: RunningDaemon, op: str, pid: int) -> Callable[[], bool]:
    line = f"Refused {op!r} to client pid {pid} uid {NOBODY}"
    return lambda: line in daemon.log_text()


def assert_exit_77(run: dict[str, Any], says: str) -> None:
    assert run["status"] == 77, run
    assert run["stdout"] == ""
    assert len(run["stderr"].splitlines()) == 1, run["stderr"]
    assert run["stderr"].startswith("busctl: ")
    assert says in run["stderr"]


def test_the_socket_gets_the_configured_mode_and_group(start_busd):
    daemon = start(start_busd, '[busd]\ngroup = "nogroup"\n')
    st = os.stat(daemon.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (0, NOGROUP)


def test_the_socket_mode_keeps_others_out(start_busd):
    # Listed as a reader, but not in the socket's group (root's, here): the
    # kernel refuses the connection before busd hears of it.
    daemon = start(start_busd, '[access]\nread_users = ["nobody"]\n')
    assert os.stat(daemon.socket).st_gid == 0
    report = as_nobody(calls(daemon.socket, "ping"))
    code, message = report["result"]["connect"]
    assert code == "permission_denied"
    assert f"no permission to connect to {daemon.socket}" in message

    run = as_nobody(command("--socket", daemon.socket, "ping"))["result"]
    assert_exit_77(run, f"no permission to connect to {daemon.socket}")


def test_without_an_allow_list_nobody_may_not_even_ping(start_busd):
    daemon = start(start_busd, '[busd]\ngroup = "nogroup"\n')
    report = as_nobody(calls(daemon.socket, "ping", "state"))
    answers = report["result"]
    assert answers["ids"] == [NOBODY, NOGROUP, []]
    assert answers["ping"] == [
        "permission_denied",
        f"uid {NOBODY} may not run 'ping' (read access)",
    ]
    assert answers["state"][0] == "permission_denied"
    wait_for(refused_in_log(daemon, "ping", report["pid"]), what="the refusal logged")

    run = as_nobody(command("--socket", daemon.socket, "ping"))["result"]
    assert_exit_77(run, "may not run 'ping'")


def test_readers_may_read_but_not_write(start_busd):
    config = '[busd]\ngroup = "nogroup"\n[access]\nread_users = ["nobody"]\n'
    daemon = start(start_busd, config)
    report = as_nobody(calls(daemon.socket, "ping", "state", "publish", "shutdown"))
    answers = report["result"]
    assert answers["ping"] == ["ok", "pong"]
    assert answers["state"][0] == "ok"
    assert answers["state"][1]["state"] == "STARTED"
    for op in ("publish", "shutdown"):
        assert answers[op] == [
            "permission_denied",
            f"uid {NOBODY} may not run {op!r} (write access)",
        ]
        wait_for(refused_in_log(daemon, op, report["pid"]), what=f"{op} refused")

    run = as_nobody(command("--socket", daemon.socket, "publish", "main", "x"))
    assert_exit_77(run["result"], "may not run 'publish'")
    wait_for(refused_in_log(daemon, "publish", run["pid"]), what="the CLI refused")

    # Still running, and root, on no list, may do anything.
    assert daemon.process.poll() is None
    with daemon.client() as root:
        assert root.publish("main", "from root")["id"] >= 1
        assert root.state()["published"] == 1
        assert root.shutdown()["stopping"] is True
    assert daemon.process.wait(15) == 0


def test_writer_groups_may_publish(start_busd):
    config = '[busd]\ngroup = "nogroup"\n[access]\nwrite_groups = ["nogroup"]\n'
    daemon = start(start_busd, config)
    with daemon.client() as listener:
        stream = listener.subscribe("main")
        # Write access implies read access.
        answers = as_nobody(calls(daemon.socket, "ping", "publish"))["result"]
        assert answers["ping"] == ["ok", "pong"]
        assert answers["publish"][0] == "ok"
        assert stream.next_event(10) == {"channel": "main", "message": "from nobody"}

        run = as_nobody(command("--socket", daemon.socket, "publish", "main", "x"))
        assert run["result"]["status"] == 0, run
        assert run["result"]["stdout"].startswith("published message ")
        assert stream.next_event(10) == {"channel": "main", "message": "x"}
    assert "Refused" not in daemon.log_text()


# -- every op, for each kind of caller -------------------------------------------------

READ_OPS = (
    "hello",
    "ping",
    "state",
    "subscribe",
    "events",
    "logs",
    "cancel",
    "dead_list",
    "dead_show",
)
WRITE_OPS = (
    "publish",
    "dead_replay",
    "dead_drop",
    "broker_start",
    "broker_stop",
    "broker_restart",
    "scale",
    "reload",
    "shutdown",
)
#: Each op's arguments. The broker ops name a broker that does not exist,
#: the dead-letter ops a letter that does not exist,
#: and ``shutdown`` gets an argument it does not take: an allowed caller
#: gets past the access check to the op's own refusal, and busd keeps
#: running for the next caller. ``cancel`` ends this connection's
#: ``subscribe`` (its request id is 4, the fourth request sent).
ARGUMENTS: dict[str, dict[str, Any]] = {
    "hello": {"versions": [PROTOCOL_VERSION]},
    "subscribe": {"channels": ["main"]},
    "logs": {"lines": 1},
    "cancel": {"stream": 4},
    "publish": {"channel": "main", "message": "from the matrix"},
    "broker_start": {"broker": "absent"},
    "broker_stop": {"broker": "absent"},
    "broker_restart": {"broker": "absent"},
    "scale": {"broker": "absent", "instances": 1},
    "shutdown": {"now": True},
    "dead_show": {"letter": 1},
    "dead_replay": {"ids": [1]},
    "dead_drop": {"ids": [1]},
}
NO_BROKER = ["not_found", "no broker 'absent' (configured: none)"]
NO_LETTER = [
    "not_found",
    "no dead letter 1 (the store holds no letters; `busctl dead list` shows them)",
]
#: What an allowed caller gets: the answer of an op that ran.
ALLOWED = {
    **{op: ["ok"] for op in (*READ_OPS, "publish", "reload")},
    **{op: NO_LETTER for op in ("dead_show", "dead_replay", "dead_drop")},
    **{op: NO_BROKER for op in ("broker_start", "broker_stop", "broker_restart")},
    "scale": NO_BROKER,
    "shutdown": ["bad_request", "'shutdown' takes no argument 'now' (it takes: none)"],
}
READER, UID_WRITER, GROUP_WRITER, OUTSIDER = NOBODY, 54321, 54322, 54323
MATRIX_CONFIG = """
[busd]
socket_mode = "0666"

[access]
read_users = ["nobody"]
write_users = [54321]
write_groups = ["nogroup"]
"""


def every_op(path: str) -> Callable[[], dict[str, Any]]:
    """Work for ``fork_as``: every op in turn on one connection, the answers."""

    def work() -> dict[str, Any]:
        answers: dict[str, Any] = {}
        with Client(path, timeout=10) as client:
            for op in (*READ_OPS, *WRITE_OPS):
                request_id = client.send(op, **ARGUMENTS.get(op, {}))
                if op == "subscribe":
                    assert request_id == ARGUMENTS["cancel"]["stream"]
                try:
                    client.wait(request_id)
                except BusError as error:
                    answers[op] = [error.code, error.message]
                else:
                    answers[op] = ["ok"]
        return answers

    return work


@pytest.mark.parametrize(
    ("who", "uid", "gid", "groups", "level"),
    [
        ("read_users member, by name", READER, 54400, (), "read"),
        ("write_users member, by uid", UID_WRITER, 54401, (), "write"),
        ("write_groups member", GROUP_WRITER, 54402, (NOGROUP,), "write"),
        ("on no list", OUTSIDER, 54403, (), None),
    ],
)
def test_every_op_is_allowed_or_refused_by_its_access_level(
    start_busd, who, uid, gid, groups, level
):
    """Each op of busd, called by a reader, a writer named by uid, a member of
    a writer group, and an outsider: read ops are allowed to readers and
    writers, write ops to writers only; the others get ``permission_denied``
    naming the op and its level, and busd keeps running.
    """
    daemon = start(start_busd, MATRIX_CONFIG)
    with daemon.client() as root:
        # The matrix is every op busd has: a new op must be placed in it.
        assert sorted(root.hello()["ops"]) == sorted((*READ_OPS, *WRITE_OPS))
    answers = finish(fork_as(every_op(daemon.socket), uid, gid, groups))["result"]
    for op in (*READ_OPS, *WRITE_OPS):
        needs = "write" if op in WRITE_OPS else "read"
        if level == "write" or level == needs:
            assert answers[op] == ALLOWED[op], (who, op)
        else:
            assert answers[op] == [
                "permission_denied",
                f"uid {uid} may not run {op!r} ({needs} access)",
            ], (who, op)
    with daemon.client() as root:
        assert root.ping() == "pong"  # no shutdown got through
    if level == "write":
        # The real thing, last: the writer shuts busd down.
        with_shutdown = finish(
            fork_as(
                lambda: Client(daemon.socket, timeout=10).call("shutdown")["stopping"],
                uid,
                gid,
                groups,
            )
        )
        assert with_shutdown["result"] is True
        assert daemon.process.wait(15) == 0


def test_a_reload_that_revokes_access_applies_to_open_connections(start_busd):
    """A connection opened while its user may write loses that right as soon
    as a reload takes it away: its access is not fixed at connect time.
    """
    before = '[busd]\ngroup = "nogroup"\n[access]\nwrite_users = ["nobody"]\n'
    after = '[busd]\ngroup = "nogroup"\n[access]\nread_users = ["nobody"]\n'
    daemon = start(start_busd, before)
    ready_r, ready_w = os.pipe()  # child -> test: "connected, and allowed"
    go_r, go_w = os.pipe()  # test -> child: "reloaded" (or EOF: gave up)

    def work() -> dict[str, Any]:
        os.close(ready_r)
        os.close(go_w)

        def both(client: Client) -> list[Any]:
            found = []
            for op, arguments in (("ping", {}), ("publish", ARGUMENTS["publish"])):
                try:
                    client.call(op, **arguments)
                    found.append("ok")
                except BusError as error:
                    found.append([error.code, error.message])
            return found

        with Client(daemon.socket, timeout=10) as client:
            answers = {"before": both(client)}
            os.write(ready_w, b"r")
            os.read(go_r, 1)
            answers["after"] = both(client)
        with Client(daemon.socket, timeout=10) as fresh:
            answers["new connection"] = both(fresh)
        return answers

    child = fork_as(work, NOBODY, NOGROUP)
    os.close(ready_w)
    os.close(go_r)
    try:
        readable, _, _ = select.select([ready_r], [], [], CHILD_DEADLINE)
        assert readable, "the child never connected"
        daemon.config.write_text(after)
        with daemon.client() as root:
            assert root.reload() == {"reloading": True}
        wait_for(
            lambda: "Reloaded configuration" in daemon.log_text(),
            what="the reload to be applied",
        )
        os.write(go_w, b"g")
    finally:
        os.close(go_w)
        os.close(ready_r)
        answers = finish(child)["result"]
    refused = [
        "permission_denied",
        f"uid {NOBODY} may not run 'publish' (write access)",
    ]
    assert answers == {
        "before": ["ok", "ok"],
        "after": ["ok", refused],
        "new connection": ["ok", refused],
    }
