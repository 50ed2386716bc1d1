"""Who is calling, and what they may do: the peer's credentials and the
access policy of ``[access]``.

The kernel says who is at the other end of a connection (SO_PEERCRED,
SO_PEERGROUPS); the policy says whether that peer may run read ops or
write ops. Root and busd's own user may always run everything.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import NamedTuple

from busd.config import Config
from busd.principals import gid_of, name_of_uid, uid_of

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13

READ = "read"
WRITE = "write"


class Peer(NamedTuple):
    """Who is on the other end of a connection, from the kernel (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]

    def __str__(self) -> str:
        return f"pid {self.pid} uid {self.uid}"


class AccessPolicy(NamedTuple):
    """Who may run read ops and write ops (write implies read).

    Root and busd's own user are always allowed.
    """

    read_uids: frozenset[int] = frozenset()
    read_gids: frozenset[int] = frozenset()
    write_uids: frozenset[int] = frozenset()
    write_gids: frozenset[int] = frozenset()

    def allows(self, peer: Peer, level: str) -> bool:
        """Whether ``peer`` may run an op of ``level`` (READ or WRITE)."""
        if peer.uid in (0, os.geteuid()):
            return True
        groups = peer.groups | {peer.gid}
        if peer.uid in self.write_uids or groups & self.write_gids:
            return True
        if level == READ:
            return peer.uid in self.read_uids or bool(groups & self.read_gids)
        return False


def access_policy(config: Config) -> AccessPolicy:
    """The allow-lists of ``[access]`` with names resolved to ids.

    Raises ValueError naming the key of an unknown user or group.
    """
    access = config.access
    return AccessPolicy(
        read_uids=frozenset(
            uid_of(u, "[access] read_users") for u in access.read_users
        ),
        read_gids=frozenset(
            gid_of(g, "[access] read_groups") for g in access.read_groups
        ),
        write_uids=frozenset(
            uid_of(u, "[access] write_users") for u in access.write_users
        ),
        write_gids=frozenset(
            gid_of(g, "[access] write_groups") for g in access.write_groups
        ),
    )


def peer_of(sock: socket.socket) -> Peer:
    """The credentials of the process at the other end of ``sock``."""
    # struct ucred: pid_t (signed), uid_t and gid_t (unsigned: a uid may be
    # 2**31 or more, in a user namespace's range say).
    pid, uid, gid = struct.unpack(
        "iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    )
    try:
        # 1024 bytes (256 groups) is the most CPython's getsockopt() takes: a
        # larger buffer fails with "buflen out of range" before the kernel is
        # asked. A peer with more groups gets ERANGE: the fallback below.
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        groups = frozenset(struct.unpack(f"{len(raw) // 4}I", raw))
    except OSError:
        # Older kernels, or over 256 groups: the user database's groups.
        name = name_of_uid(uid)
        groups = frozenset(os.getgrouplist(name, gid)) if name else frozenset()
    return Peer(pid, uid, gid, groups)
