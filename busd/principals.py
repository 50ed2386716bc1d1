"""Users and groups named in the config, looked up in one place, by one rule.

The config parser checks only the syntax of a user or group (a name, or a
number). Everything that needs the id behind it asks this module, so that
``busd check-config``, a reload, the access policy, the socket's group and
a worker's owner cannot disagree about what a name means:

- a **name** must exist in the user (or group) database;
- a **number** in an allow-list or as the socket's group is taken as it is:
  the kernel reports a caller's uid and gids whether or not the database
  knows them;
- a user that a **process runs as** (``[busd] user``, a broker's ``user``)
  must exist in the user database, name or number: its primary group and
  its supplementary groups come from there.

Every lookup that fails raises ValueError naming the config key.
"""

from __future__ import annotations

import grp
import pwd
from typing import NamedTuple


class Identity(NamedTuple):
    """Who a process runs as: uid, primary gid, every group (initgroups)."""

    uid: int
    gid: int
    groups: tuple[int, ...]


def uid_of(user: str | int, where: str) -> int:
    """A uid from a name or number; ValueError naming ``where`` if unknown."""
    if isinstance(user, int):
        return user
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ValueError(f"{where}: unknown user {user!r}") from None


def gid_of(group: str | int, where: str) -> int:
    """A gid from a name or number; ValueError naming ``where`` if unknown."""
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"{where}: unknown group {group!r}") from None


def identity_of(user: str | int, where: str) -> Identity:
    """What a process run as ``user`` gets: uid, gid and groups.

    Unlike :func:`uid_of`, a number must be in the user database too: a
    process needs a primary group, which only the database can give.
    """
    try:
        entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    except KeyError:
        kind = "uid" if isinstance(user, int) else "user"
        raise ValueError(
            f"{where}: unknown {kind} {user!r} (a process needs a user that "
            "exists in the user database, for its groups)"
        ) from None
    # As initgroups(3) does: the primary group among the supplementary ones.
    groups = [entry.pw_gid] + [
        g.gr_gid
        for g in grp.getgrall()
        if entry.pw_name in g.gr_mem and g.gr_gid != entry.pw_gid
    ]
    return Identity(entry.pw_uid, entry.pw_gid, tuple(groups))


def name_of_uid(uid: int) -> str | None:
    """The user name of ``uid``, or None when the database does not know it."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None
