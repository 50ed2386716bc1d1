"""Socket activation: busd serves the control socket systemd passes it.

In-process, :func:`take_control_socket` reads LISTEN_PID / LISTEN_FDS /
LISTEN_FDNAMES with descriptors placed as systemd places them (one after
the other), and says clearly what is wrong with a bad set. End to end, a
real ``busd run`` is started as systemd starts it: a listening socket at
fd 3 and LISTEN_PID naming its own PID (a small launcher sets both, then
execs busd, which keeps the PID). tests/test_systemd.py does the same
through a real systemd and systemd/busd.socket.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import (
    ORDERS,
    STARTUP_DEADLINE,
    RunningDaemon,
    answers,
    busd_run,
    instance_pids,
    wait_for,
)

from busctl.client import Client
from busd.control.activation import (
    ACTIVATION_ENVIRONMENT,
    ActivationError,
    InheritedSocket,
    take_control_socket,
)

EX_CONFIG = 78
# Where the in-process tests place "passed" descriptors: far above any the
# test process has open, so that dup2 replaces nothing.
FIRST_TEST_FD = 700


@contextlib.contextmanager
def passed(*files: socket.socket | int) -> Iterator[int]:
    """Copies of ``files`` at consecutive descriptors, as systemd passes them
    (inheritable); yields the first. Whatever is left open is closed after."""
    targets = range(FIRST_TEST_FD, FIRST_TEST_FD + len(files))
    for target in targets:
        with pytest.raises(OSError):
            os.fstat(target)  # free, or the test would close someone's file
    try:
        for file, target in zip(files, targets, strict=True):
            fd = file if isinstance(file, int) else file.fileno()
            os.dup2(fd, target, inheritable=True)
        yield FIRST_TEST_FD
    finally:
        for target in targets:
            with contextlib.suppress(OSError):
                os.close(target)


def environ(count: int, names: str | None = None, pid: int | None = None) -> dict:
    env = {"LISTEN_PID": str(os.getpid() if pid is None else pid)}
    env["LISTEN_FDS"] = str(count)
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    return env | {"OTHER": "kept"}


def listening(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


def take(env: dict, first_fd: int) -> InheritedSocket | None:
    return take_control_socket(env, first_fd=first_fd)


def refused(env: dict, first_fd: int) -> str:
    with pytest.raises(ActivationError) as error:
        take(env, first_fd)
    assert not set(ACTIVATION_ENVIRONMENT) & set(env), "LISTEN_* left behind"
    return str(error.value)


# -- LISTEN_* in-process ---------------------------------------------------------------


def test_no_variables_means_not_activated() -> None:
    env = {"OTHER": "kept"}
    assert take(env, FIRST_TEST_FD) is None
    assert env == {"OTHER": "kept"}


def test_the_only_socket_is_taken_whatever_its_name(tmp_path: Path) -> None:
    path = tmp_path / "busd.sock"
    with listening(path) as ours, passed(ours) as first:
        env = environ(1, "busd.socket")
        inherited = take(env, first)
        assert inherited is not None
        with inherited.sock:
            assert env == {"OTHER": "kept"}, "LISTEN_* must not reach workers"
            assert (inherited.path, inherited.name, inherited.fd) == (
                str(path),
                "busd.socket",
                first,
            )
            assert inherited.sock.fileno() == first
            assert not os.get_inheritable(first), "close-on-exec"
            assert not inherited.sock.getblocking()
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(path))
                wait_for(lambda: _accepts(inherited.sock), what="the connection")


def _accepts(sock: socket.socket) -> bool:
    try:
        sock.accept()[0].close()
    except BlockingIOError:
        return False
    return True


def test_the_descriptor_named_control_is_taken_and_the_others_closed(
    tmp_path: Path,
) -> None:
    with (
        listening(tmp_path / "other.sock") as other,
        listening(tmp_path / "busd.sock") as control,
        passed(other, control) as first,
    ):
        inherited = take(environ(2, "other:control"), first)
        assert inherited is not None
        with inherited.sock:
            assert (inherited.fd, inherited.path) == (
                first + 1,
                str(tmp_path / "busd.sock"),
            )
            with pytest.raises(OSError):
                os.fstat(first)  # not busd's: closed


def test_another_pid_means_the_variables_are_not_ours(tmp_path: Path) -> None:
    with listening(tmp_path / "busd.sock") as ours, passed(ours) as first:
        env = environ(1, "control", pid=os.getpid() + 1)
        assert take(env, first) is None
        assert env == {"OTHER": "kept"}, "removed all the same"
        assert stat.S_ISSOCK(os.fstat(first).st_mode), "someone else's: left open"


def test_zero_descriptors_means_not_activated() -> None:
    env = environ(0)
    assert take(env, FIRST_TEST_FD) is None
    assert env == {"OTHER": "kept"}


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("LISTEN_FDS", "two", "LISTEN_FDS='two' is not a count"),
        ("LISTEN_FDS", "-1", "LISTEN_FDS='-1' is not a count"),
        ("LISTEN_FDS", "²", "LISTEN_FDS='²' is not a count"),
        ("LISTEN_PID", "me", "LISTEN_PID='me' is not a PID"),
        ("LISTEN_PID", "0", "LISTEN_PID='0' is not a PID"),
    ],
)
def test_a_malformed_variable_is_named(
    variable: str, value: str, expected: str
) -> None:
    env = environ(1, "control") | {variable: value}
    assert refused(env, FIRST_TEST_FD) == expected


def test_names_that_do_not_match_the_count_are_refused(tmp_path: Path) -> None:
    with listening(tmp_path / "busd.sock") as ours, passed(ours) as first:
        message = refused(environ(1, "control:extra"), first)
    assert message == (
        "LISTEN_FDNAMES='control:extra' names 2 descriptors, but LISTEN_FDS=1"
    )


def test_several_descriptors_none_named_control_are_refused(tmp_path: Path) -> None:
    with (
        listening(tmp_path / "a.sock") as a,
        listening(tmp_path / "b.sock") as b,
        passed(a, b) as first,
    ):
        message = refused(environ(2, "web:admin"), first)
    assert message == (
        f"systemd passed 2 descriptors and none is named 'control': {first} (web), "
        f"{first + 1} (admin); set FileDescriptorName=control on busd's control "
        "socket in its socket unit"
    )


def test_two_descriptors_named_control_are_refused(tmp_path: Path) -> None:
    with (
        listening(tmp_path / "a.sock") as a,
        listening(tmp_path / "b.sock") as b,
        passed(a, b) as first,
    ):
        message = refused(environ(2, "control:control"), first)
    assert message.startswith("systemd passed 2 descriptors named 'control'")


def test_a_pipe_is_not_a_socket() -> None:
    read, write = os.pipe()
    try:
        with passed(read) as first:
            message = refused(environ(1, "control"), first)
    finally:
        os.close(read)
        os.close(write)
    assert message == (
        f"fd {first} (control) from systemd is a FIFO (pipe), not a socket; "
        "busd needs ListenStream=PATH in its socket unit"
    )


def test_a_regular_file_is_not_a_socket(tmp_path: Path) -> None:
    with open(tmp_path / "file", "w") as file, passed(file.fileno()) as first:
        message = refused(environ(1), first)
    assert message.startswith(f"fd {first} from systemd is a regular file, not a")


def test_a_descriptor_that_is_not_open_is_named() -> None:
    message = refused(environ(1, "control"), FIRST_TEST_FD)
    assert message == (
        f"fd {FIRST_TEST_FD} (control) from systemd is not open: Bad file descriptor"
    )


def test_a_datagram_socket_is_refused(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dgram:
        dgram.bind(str(tmp_path / "busd.sock"))
        with passed(dgram) as first:
            message = refused(environ(1, "control"), first)
    assert message == (
        f"fd {first} (control) from systemd is a SOCK_DGRAM socket; busd needs "
        "ListenStream= (SOCK_STREAM)"
    )


def test_a_socket_that_does_not_listen_is_refused(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as quiet:
        quiet.bind(str(tmp_path / "busd.sock"))
        with passed(quiet) as first:
            message = refused(environ(1, "control"), first)
    assert message == (
        f"fd {first} (control) from systemd is a socket that is not listening; "
        "set Accept=no in the socket unit"
    )


def test_a_tcp_socket_is_refused() -> None:
    with socket.create_server(("127.0.0.1", 0)) as tcp, passed(tcp) as first:
        message = refused(environ(1, "control"), first)
    assert message == (
        f"fd {first} (control) from systemd is an AF_INET socket; busd's control "
        "socket is AF_UNIX"
    )


def test_an_abstract_socket_is_refused() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as abstract:
        abstract.bind(f"\0busd-test-{os.getpid()}")
        abstract.listen()
        with passed(abstract) as first:
            message = refused(environ(1, "control"), first)
    assert message.startswith(
        f"fd {first} (control) from systemd is not bound to a path in the file system"
    )


# -- a real busd given its socket ------------------------------------------------------


# Runs as the PID busd will have, moves the passed socket to fd 3 and execs
# busd: what systemd does between fork and exec. LISTEN_PID is the given one,
# or this very PID.
EXEC_AS_SYSTEMD = """
import os, sys
passed, listen_pid, *command = sys.argv[1:]
os.dup2(int(passed), 3)
os.close(int(passed))
os.environ["LISTEN_PID"] = listen_pid or str(os.getpid())
os.execv(command[0], command)
"""


def start_activated(
    directory: Path,
    passed_fd: int,
    config_socket: str,
    names: str = "control",
    listen_pid: str = "",
    config_text: str = ORDERS,
) -> RunningDaemon:
    """``busd run`` started as systemd starts it: ``passed_fd`` at fd 3 and
    LISTEN_* naming its PID (or ``listen_pid``)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "busd.toml"
    config.write_text(config_text)
    log = directory / "busd.log"
    pidfile = str(directory / "busd.pid")
    # Above 3, so that moving it to 3 cannot close it first.
    high = fcntl.fcntl(passed_fd, fcntl.F_DUPFD_CLOEXEC, 10)
    env = {
        **{k: v for k, v in os.environ.items() if k not in ACTIVATION_ENVIRONMENT},
        "LISTEN_FDS": "1",
        "LISTEN_FDNAMES": names,
    }
    command = busd_run(config, config_socket, pidfile)
    try:
        with open(log, "wb") as log_file:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    EXEC_AS_SYSTEMD,
                    str(high),
                    listen_pid,
                    *command,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                env=env,
                pass_fds=(high,),
            )
    finally:
        os.close(high)
    return RunningDaemon(process, directory, config_socket, pidfile, config, log)


@pytest.fixture
def daemons() -> Iterator[list[RunningDaemon]]:
    """The daemons a test started, killed by PID at its end if still running.
    (Its tests are marked ``daemon`` by hand: conftest.py knows only its own
    fixtures.)"""
    started: list[RunningDaemon] = []
    yield started
    for daemon in started:
        daemon.kill()


def wait_answering(daemon: RunningDaemon, path: str) -> None:
    def up() -> bool:
        assert daemon.process.poll() is None, daemon.log_text()
        return answers(path)

    wait_for(up, STARTUP_DEADLINE, f"busd answering on {path}")


def socket_inode(pid: int, fd: int) -> int:
    match = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
    assert match, f"fd {fd} of PID {pid} is not a socket"
    return int(match.group(1))


def held_sockets(pid: int) -> set[int]:
    """The inodes of the sockets process ``pid`` holds."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            match = re.fullmatch(
                r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}")
            )
            if match:
                found.add(int(match.group(1)))
    return found


def close_on_exec(pid: int, fd: int) -> bool:
    with open(f"/proc/{pid}/fdinfo/{fd}") as info:
        flags = next(line for line in info if line.startswith("flags:"))
    return bool(int(flags.split()[1], 8) & os.O_CLOEXEC)


@pytest.mark.daemon
def test_busd_serves_the_socket_it_is_given_and_leaves_it_at_exit(
    tmp_path: Path, daemons: list[RunningDaemon]
) -> None:
    path = tmp_path / "busd.sock"
    with listening(path) as ours:
        # systemd's SocketMode=: busd must not change it (it would make 0660).
        os.chmod(path, 0o600)
        inode = os.stat(path).st_ino
        daemon = start_activated(tmp_path / "run", ours.fileno(), str(path))
        daemons.append(daemon)
        wait_answering(daemon, str(path))
        with daemon.client() as client:
            described = client.state()
        assert described["pid"] == daemon.pid
        assert described["socket"] == str(path)
        assert socket_inode(daemon.pid, 3) == os.fstat(ours.fileno()).st_ino
        assert close_on_exec(daemon.pid, 3)
        assert (os.stat(path).st_ino, stat.S_IMODE(os.stat(path).st_mode)) == (
            inode,
            0o600,
        )
        # Neither the fork server nor a worker sees LISTEN_* or holds the socket.
        fork_server = described["fork_server"]
        workers = wait_for(lambda: instance_pids(daemon), what="workers")
        served = os.fstat(ours.fileno()).st_ino
        for pid in (fork_server, *workers.values()):
            leaked = set(psutil.Process(pid).environ()) & set(ACTIVATION_ENVIRONMENT)
            assert not leaked, f"PID {pid} sees {leaked}"
            assert served not in held_sockets(pid), f"PID {pid} holds the socket"
        assert "Control socket from systemd: fd 3 (control)" in daemon.log_text()

        assert daemon.stop() == 0, daemon.log_text()
        # The file is systemd's: still there, still the same socket, and a
        # client that connects now waits in its queue for the next busd.
        assert os.stat(path).st_ino == inode
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))


@pytest.mark.daemon
def test_busd_serves_the_given_socket_when_the_config_names_another(
    tmp_path: Path, daemons: list[RunningDaemon]
) -> None:
    path = tmp_path / "systemd.sock"
    configured = str(tmp_path / "configured.sock")
    with listening(path) as ours:
        daemon = start_activated(tmp_path / "run", ours.fileno(), configured, "")
        daemons.append(daemon)
        wait_answering(daemon, str(path))
        with Client(str(path)) as client:
            assert client.state()["socket"] == str(path)
        assert not os.path.exists(configured)
        warning = (
            f"[busd] socket is {configured} but systemd passed {path}: serving "
            f"{path}, the one clients reach; make the two paths the same"
        )
        assert warning in daemon.log_text()
        assert daemon.stop() == 0, daemon.log_text()


@pytest.mark.daemon
def test_a_passed_descriptor_that_is_not_a_socket_stops_busd_with_one_line(
    tmp_path: Path, daemons: list[RunningDaemon]
) -> None:
    read, write = os.pipe()
    try:
        daemon = start_activated(tmp_path, read, str(tmp_path / "busd.sock"))
        daemons.append(daemon)
        assert daemon.process.wait(STARTUP_DEADLINE) == EX_CONFIG
    finally:
        os.close(read)
        os.close(write)
    assert daemon.log_text() == (
        "busd: fd 3 (control) from systemd is a FIFO (pipe), not a socket; "
        "busd needs ListenStream=PATH in its socket unit\n"
    )
    assert not os.path.exists(tmp_path / "busd.sock")


@pytest.mark.daemon
def test_listen_variables_for_another_pid_are_ignored_and_not_passed_on(
    tmp_path: Path, daemons: list[RunningDaemon]
) -> None:
    # A parent's LISTEN_* leaked into busd's environment: busd binds its own
    # socket, and its fork server and workers do not inherit the variables.
    with listening(tmp_path / "parent.sock") as parents:
        own = str(tmp_path / "busd.sock")
        daemon = start_activated(
            tmp_path / "run", parents.fileno(), own, listen_pid="1"
        )
        daemons.append(daemon)
        wait_answering(daemon, own)
        assert stat.S_ISSOCK(os.stat(own).st_mode)
        with daemon.client() as client:
            fork_server = client.state()["fork_server"]
        workers = wait_for(lambda: instance_pids(daemon), what="workers")
        for pid in (fork_server, *workers.values()):
            leaked = set(psutil.Process(pid).environ()) & set(ACTIVATION_ENVIRONMENT)
            assert not leaked, f"PID {pid} sees {leaked}"
        assert daemon.stop() == 0, daemon.log_text()
        assert not os.path.exists(own), "its own socket, removed at exit"
