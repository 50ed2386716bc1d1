"""DropPrivileges: a real drop to ``nobody``, in a child process, seen in /proc."""

from __future__ import annotations

import grp
import os
import pwd
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from busd.bus import Bus
from busd.plugins.privileges import START_PRIORITY, DropPrivileges

TIMEOUT = 15.0

NOBODY = pwd.getpwnam("nobody")
NOGROUP = grp.getgrgid(NOBODY.pw_gid)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

# Drops privileges as asked by argv (a Python literal of keyword arguments),
# reports, then keeps running until stdin closes so /proc can be read.
DROPPER = r"""
import ast, sys
from busd.bus import Bus
from busd.plugins.privileges import DropPrivileges

bus = Bus()
bus.subscribe("log", lambda msg, level: print(msg, flush=True))
DropPrivileges(bus, **ast.literal_eval(sys.argv[1])).subscribe()
bus.start()
print("DONE", flush=True)
sys.stdin.read()
bus.exit()
"""


def read_until(proc: subprocess.Popen[str], text: str) -> list[str]:
    """Read ``proc``'s lines up to one equal to ``text``, with a deadline."""
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout

    def pump() -> None:
        for line in stdout:
            lines.put(line.rstrip("\n"))
            if line.rstrip("\n") == text:
                return
        lines.put("<EOF>")

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    while not seen or seen[-1] != text:
        try:
            seen.append(lines.get(timeout=TIMEOUT))
        except queue.Empty:
            raise AssertionError(f"no {text!r} within {TIMEOUT} s: {seen}") from None
        assert seen[-1] != "<EOF>", seen
    return seen


def proc_status(pid: int) -> dict[str, list[str]]:
    """The fields of /proc/<pid>/status, split on whitespace."""
    with open(f"/proc/{pid}/status") as file:
        return {
            key: value.split()
            for key, _, value in (line.partition(":") for line in file)
        }


@pytest.fixture
def dropper() -> Iterator[Callable[..., tuple[subprocess.Popen[str], list[str]]]]:
    """Run DROPPER; every child is killed by its PID at teardown."""
    started: list[subprocess.Popen[str]] = []

    def run(**kwargs: object) -> tuple[subprocess.Popen[str], list[str]]:
        proc = subprocess.Popen(
            [sys.executable, "-c", DROPPER, repr(kwargs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd="/",  # readable by nobody too, after the drop
        )
        started.append(proc)
        return proc, read_until(proc, "DONE")

    yield run
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(TIMEOUT)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def finish(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(TIMEOUT) == 0


@needs_root
@pytest.mark.parametrize("user", ["nobody", NOBODY.pw_uid, str(NOBODY.pw_uid)])
def test_drop_to_a_user_sets_groups_gid_uid_and_umask(dropper, user) -> None:
    proc, output = dropper(user=user, umask="027")
    uid, gid = NOBODY.pw_uid, NOBODY.pw_gid
    assert f"Dropped privileges to uid={uid} gid={gid} groups={gid} umask=027" in (
        output
    )
    status = proc_status(proc.pid)
    assert status["Uid"] == [str(uid)] * 4  # real, effective, saved, fs
    assert status["Gid"] == [str(gid)] * 4
    assert status["Groups"] == [str(gid)]  # root's group 0 is gone
    assert status["Umask"] == ["0027"]
    finish(proc)


@needs_root
def test_drop_to_a_group_only_keeps_the_uid(dropper) -> None:
    proc, output = dropper(group=NOGROUP.gr_name)
    gid = NOGROUP.gr_gid
    assert f"Dropped privileges to uid=0 gid={gid} groups={gid} umask=unchanged" in (
        output
    )
    status = proc_status(proc.pid)
    assert status["Uid"] == ["0"] * 4
    assert status["Gid"] == [str(gid)] * 4
    assert status["Groups"] == [str(gid)]
    finish(proc)


@needs_root
def test_without_root_it_refuses_naming_the_user_unless_already_there() -> None:
    script = r"""
import sys
from busd.bus import Bus
from busd.plugins.privileges import DropPrivileges

DropPrivileges(Bus(), user="nobody").start()
try:
    DropPrivileges(Bus(), user="root").start()
except PermissionError as error:
    print("REFUSED", error, flush=True)
DropPrivileges(Bus(), user="nobody", umask=0o077).start()  # already nobody
print("SAME USER OK", flush=True)
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    refused, same = done.stdout.splitlines()
    assert refused.startswith("REFUSED cannot switch to user 'root' (uid=0, gid=0)")
    assert f"runs as uid {NOBODY.pw_uid}, not root" in refused
    assert same == "SAME USER OK"


def test_unknown_names_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="unknown user 'no-such-busd-user'"):
        DropPrivileges(Bus(), user="no-such-busd-user")
    with pytest.raises(ValueError, match="unknown group 'no-such-busd-group'"):
        DropPrivileges(Bus(), user="nobody", group="no-such-busd-group")


def test_resolved_ids_are_exposed_and_nothing_changes_before_start() -> None:
    before = (os.getuid(), os.getgid(), os.getgroups())
    plugin = DropPrivileges(Bus(), user="nobody", group=NOGROUP.gr_name, umask="022")
    assert (plugin.uid, plugin.gid, plugin.umask) == (
        NOBODY.pw_uid,
        NOGROUP.gr_gid,
        0o022,
    )
    only_group = DropPrivileges(Bus(), group=NOGROUP.gr_gid)
    assert (only_group.uid, only_group.gid) == (None, NOGROUP.gr_gid)
    assert DropPrivileges.start.priority == START_PRIORITY == 77
    assert (os.getuid(), os.getgid(), os.getgroups()) == before


def test_a_uid_without_passwd_entry_needs_a_group() -> None:
    unused = next(uid for uid in range(54321, 64000) if not _has_passwd(uid))
    with pytest.raises(ValueError, match=f"user {unused} has no passwd entry"):
        DropPrivileges(Bus(), user=unused)
    plugin = DropPrivileges(Bus(), user=unused, group=NOGROUP.gr_gid)
    assert (plugin.uid, plugin.gid) == (unused, NOGROUP.gr_gid)


def _has_passwd(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def test_cherrypy_positional_order_is_umask_uid_gid() -> None:
    plugin = DropPrivileges(Bus(), 0o022)  # a umask, not a user
    assert (plugin.umask, plugin.uid, plugin.gid) == (0o022, None, None)
    plugin = DropPrivileges(Bus(), 0o027, "nobody", NOGROUP.gr_name)
    assert (plugin.umask, plugin.uid, plugin.gid) == (
        0o027,
        NOBODY.pw_uid,
        NOGROUP.gr_gid,
    )
    plugin = DropPrivileges(Bus(), umask=0o022, uid=0, gid=0)
    assert (plugin.umask, plugin.uid, plugin.gid) == (0o022, 0, 0)
    assert plugin.finalized is False


def test_uid_gid_umask_properties_take_names_numbers_and_bytes() -> None:
    plugin = DropPrivileges(Bus())
    plugin.uid = "nobody"
    plugin.gid = NOGROUP.gr_name.encode()
    plugin.umask = "077"
    assert (plugin.uid, plugin.gid, plugin.umask) == (
        NOBODY.pw_uid,
        NOGROUP.gr_gid,
        0o077,
    )
    plugin.uid = b"nobody"
    plugin.gid = 4242
    assert (plugin.uid, plugin.gid) == (NOBODY.pw_uid, 4242)
    plugin.uid = plugin.gid = plugin.umask = None
    assert (plugin.uid, plugin.gid, plugin.umask) == (None, None, None)
    with pytest.raises(ValueError, match="unknown user 'no-such-busd-user'"):
        plugin.uid = "no-such-busd-user"
    with pytest.raises(ValueError, match="unknown group 'no-such-busd-group'"):
        plugin.gid = "no-such-busd-group"
    with pytest.raises(ValueError, match="umask '9x' is not an octal number"):
        plugin.umask = "9x"


def test_cherrypy_and_busd_names_do_not_mix() -> None:
    with pytest.raises(TypeError, match=r"uid/gid .* or user/group .* not both"):
        DropPrivileges(Bus(), uid="nobody", group=NOGROUP.gr_name)


@needs_root
def test_cherrypy_uid_and_gid_empty_the_supplementary_groups(dropper) -> None:
    proc, output = dropper(uid="nobody", gid=NOGROUP.gr_name, umask=0o022)
    uid, gid = NOBODY.pw_uid, NOGROUP.gr_gid
    assert f"Dropped privileges to uid={uid} gid={gid} groups= umask=022" in output
    status = proc_status(proc.pid)
    assert status["Uid"] == [str(uid)] * 4
    assert status["Gid"] == [str(gid)] * 4
    assert status["Groups"] == []  # as CherryPy's: not the user's groups
    assert status["Umask"] == ["0022"]
    finish(proc)


@needs_root
def test_a_second_start_changes_nothing(dropper) -> None:
    script = r"""
import os
from busd.bus import Bus
from busd.plugins.privileges import DropPrivileges

plugin = DropPrivileges(Bus(), 0o027, "nobody")
plugin.start()
assert plugin.finalized
plugin.umask = 0o077
plugin.start()  # finalized: the umask stays 027
print(oct(os.umask(0)), os.getuid(), flush=True)
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"0o27 {NOBODY.pw_uid}\n"


def test_an_unknown_name_is_a_key_error_too_as_cherrypy_raises() -> None:
    with pytest.raises(KeyError) as caught:
        DropPrivileges(Bus(), uid="no-such-busd-user")
    assert isinstance(caught.value, ValueError)
    assert str(caught.value) == "unknown user 'no-such-busd-user'"
    with pytest.raises(KeyError, match="unknown group 'no-such-busd-group'"):
        DropPrivileges(Bus(), gid="no-such-busd-group")
