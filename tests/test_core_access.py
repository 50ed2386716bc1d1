"""Who may call, in-process: AccessPolicy, access_policy(config), peer_of.

tests/test_access.py checks the same rules end to end, with a client that
really is another user; these check each rule on its own, quickly.
"""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest

from busd.config import AccessConfig, Config
from busd.control import access
from busd.control.access import READ, WRITE, AccessPolicy, Peer, access_policy, peer_of

BUSD_UID = 4242  # busd's own user, when it does not run as root
STRANGER = 5000


def peer(uid: int, gid: int = 7000, groups: tuple[int, ...] = ()) -> Peer:
    return Peer(pid=123, uid=uid, gid=gid, groups=frozenset(groups))


def may(policy: AccessPolicy, who: Peer) -> tuple[bool, bool]:
    """(may read, may write)."""
    return policy.allows(who, READ), policy.allows(who, WRITE)


@pytest.fixture
def busd_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """busd runs as BUSD_UID (a `User=busd` unit), not as root."""
    monkeypatch.setattr(access.os, "geteuid", lambda: BUSD_UID)


@pytest.mark.usefixtures("busd_user")
def test_root_and_busds_own_user_may_do_everything_with_empty_lists() -> None:
    policy = AccessPolicy()
    assert may(policy, peer(0)) == (True, True)
    assert may(policy, peer(BUSD_UID)) == (True, True)
    assert may(policy, peer(STRANGER)) == (False, False)


@pytest.mark.usefixtures("busd_user")
def test_write_users_and_groups_may_write_and_so_read() -> None:
    policy = AccessPolicy(write_uids=frozenset({STRANGER}), write_gids=frozenset({80}))
    assert may(policy, peer(STRANGER)) == (True, True)
    assert may(policy, peer(STRANGER + 1, gid=80)) == (True, True)  # primary group
    assert may(policy, peer(STRANGER + 1, groups=(3, 80))) == (True, True)
    assert may(policy, peer(STRANGER + 1, groups=(3, 81))) == (False, False)


@pytest.mark.usefixtures("busd_user")
def test_read_users_and_groups_may_read_only() -> None:
    policy = AccessPolicy(read_uids=frozenset({STRANGER}), read_gids=frozenset({90}))
    assert may(policy, peer(STRANGER)) == (True, False)
    assert may(policy, peer(STRANGER + 1, gid=90)) == (True, False)
    assert may(policy, peer(STRANGER + 1, groups=(90,))) == (True, False)
    assert may(policy, peer(STRANGER + 1, groups=(91,))) == (False, False)
    # A read list says nothing about writing, even for a listed group.
    both = policy._replace(write_uids=frozenset({STRANGER + 2}))
    assert may(both, peer(STRANGER + 2, groups=(90,))) == (True, True)


def config(**lists: tuple[str | int, ...]) -> Config:
    return dataclasses.replace(Config(), access=AccessConfig(**lists))


def test_access_policy_resolves_names_and_keeps_numbers() -> None:
    policy = access_policy(
        config(
            read_users=("nobody", 5001),
            read_groups=("nogroup", 6001),
            write_users=("root", 5002),
            write_groups=("root", 6002),
        )
    )
    assert policy == AccessPolicy(
        read_uids=frozenset({65534, 5001}),
        read_gids=frozenset({65534, 6001}),
        write_uids=frozenset({0, 5002}),
        write_gids=frozenset({0, 6002}),
    )
    assert access_policy(Config()) == AccessPolicy()


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("read_users", "user"),
        ("read_groups", "group"),
        ("write_users", "user"),
        ("write_groups", "group"),
    ],
)
def test_an_unknown_name_is_refused_naming_its_key(key: str, kind: str) -> None:
    with pytest.raises(ValueError) as info:
        access_policy(config(**{key: ("no-such-principal",)}))
    assert str(info.value) == f"[access] {key}: unknown {kind} 'no-such-principal'"


def socketpair_with_groups(groups: list[int]) -> tuple[socket.socket, socket.socket]:
    """A connected pair whose peer credentials carry ``groups``.

    The kernel records them when the pair is made; this process's own
    groups are restored at once.
    """
    before = os.getgroups()
    os.setgroups(groups)
    try:
        return socket.socketpair()
    finally:
        os.setgroups(before)


@pytest.mark.skipif(os.geteuid() != 0, reason="setgroups needs root")
def test_peer_of_reads_the_kernels_credentials_and_groups() -> None:
    # Groups that the user database does not give this user: the kernel's
    # (SO_PEERGROUPS) are the ones that count.
    ours, theirs = socketpair_with_groups([5, 6, 70000])
    with ours, theirs:
        found = peer_of(ours)
    assert found == Peer(
        os.getpid(), os.getuid(), os.getgid(), frozenset({5, 6, 70000})
    )
    assert str(found) == f"pid {os.getpid()} uid {os.getuid()}"


def database_groups() -> frozenset[int]:
    name = access.name_of_uid(os.getuid())
    assert name is not None
    return frozenset(os.getgrouplist(name, os.getgid()))


@pytest.mark.skipif(os.geteuid() != 0, reason="setgroups needs root")
def test_a_peer_with_more_groups_than_fit_gets_the_databases() -> None:
    ours, theirs = socketpair_with_groups(list(range(1, 300)))  # ERANGE
    with ours, theirs:
        assert peer_of(ours).groups == database_groups()


def test_peer_of_without_so_peergroups_asks_the_user_database(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An old kernel: SO_PEERGROUPS is an unknown option (ENOPROTOOPT).
    monkeypatch.setattr(access, "SO_PEERGROUPS", 4000)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert peer_of(ours).groups == database_groups()
        # A uid the user database does not know: no groups but its own gid.
        monkeypatch.setattr(access, "name_of_uid", lambda uid: None)
        assert peer_of(ours).groups == frozenset()


@pytest.mark.skipif(os.geteuid() != 0, reason="setuid needs root")
def test_peer_of_reads_uids_and_gids_of_2_31_and_more() -> None:
    big = 3_000_000_000  # valid on Linux (uid_t is unsigned 32 bits)
    # An abstract address: no file whose mode could keep that user out.
    address = f"\0busd-test-peer-{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.settimeout(10)
    with listener:
        listener.bind(address)
        listener.listen(1)
        pid = os.fork()
        if pid == 0:  # the child: becomes that user, connects, waits
            status = 1
            try:
                os.setgroups([])
                os.setresgid(big + 1, big + 1, big + 1)
                os.setresuid(big, big, big)
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.connect(address)
                client.recv(1)  # until the parent closes its end
                status = 0
            finally:
                os._exit(status)
        try:
            connection, _ = listener.accept()
            with connection:
                found = peer_of(connection)
        finally:
            _, status = os.waitpid(pid, 0)
    assert (found.pid, found.uid, found.gid) == (pid, big, big + 1)
    assert os.waitstatus_to_exitcode(status) == 0
