"""Give up root once the privileged work of starting is done.

``DropPrivileges(bus, umask=None, uid=None, gid=None)`` takes CherryPy's
arguments, in CherryPy's order, and does what CherryPy's does with them:
with a ``gid``, the gid becomes it and the supplementary groups are
emptied; with a ``uid``, the uid becomes it; nothing else changes (a
``uid`` alone keeps the gid, root's group when started as root).

busd's keywords ``user`` and ``group`` ask for more, and are what busd the
daemon uses: with a ``user``, the gid defaults to the user's primary group
and the supplementary groups become that user's groups (``initgroups``);
with only a ``group``, the supplementary groups become just that group.

Order matters and is irreversible: supplementary groups first, then the
gid, then the uid (after ``setuid`` the process may no longer change its
groups).
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
from typing import TYPE_CHECKING

from daemon.daemon import change_file_creation_mask, change_process_owner

from busd.plugins.base import SimplePlugin

if TYPE_CHECKING:
    from busd.bus import Bus

__all__ = ["DropPrivileges", "UnknownNameError"]

# After the PID file (70) and the control socket (75), which need root to
# be created in /run and to give the socket its group; before brokers are
# spawned, so that they never run as root.
START_PRIORITY = 77

Identity = str | bytes | int


class UnknownNameError(ValueError, KeyError):
    """A user or group name with no entry in the system's databases.

    A ValueError (bad configuration), and a KeyError as well, which is what
    code written for CherryPy's DropPrivileges (``pwd.getpwnam``) catches.
    """

    __str__ = ValueError.__str__


class DropPrivileges(SimplePlugin):
    """At ``start``, switch to the configured owner and set the ``umask``.

    ``uid`` and ``gid`` (CherryPy's) and ``user`` and ``group`` (busd's,
    keywords only; module docstring) are names or numbers; unknown names
    raise UnknownNameError (a ValueError and a KeyError) when they are set,
    rather than halfway through starting. ``umask`` is an int or an octal
    string such as ``"027"``. The ``uid``, ``gid`` and ``umask`` properties
    hold the resolved numbers and accept the same values when set.
    ``finalized`` is True once ``start`` has run: a later start (of the
    same bus) changes nothing.

    Changing owner needs root. A process that is not root but already runs
    as the requested uid and gid (say, started by systemd with ``User=``)
    carries on; otherwise ``start`` raises PermissionError naming the target.
    """

    def __init__(
        self,
        bus: Bus,
        umask: int | str | None = None,
        uid: Identity | None = None,
        gid: Identity | None = None,
        *,
        user: Identity | None = None,
        group: Identity | None = None,
    ) -> None:
        super().__init__(bus)
        if (user is not None or group is not None) and (
            uid is not None or gid is not None
        ):
            raise TypeError(
                "DropPrivileges: give uid/gid (CherryPy's) or user/group "
                "(busd's, with supplementary groups), not both"
            )
        self.finalized = False
        self.user = user
        self.group = group
        self._uid: int | None = None
        self._gid: int | None = None
        self._umask: int | None = None
        #: The user name whose groups become the supplementary groups (only
        #: when ``user`` is given and has a passwd entry).
        self.username: str | None = None
        self.uid = uid
        self.gid = gid
        self.umask = umask
        if user is not None:
            entry = _lookup_user(user)
            if entry is None:
                # A bare number without a passwd entry: fine for the uid,
                # but there is no primary group to fall back on.
                self._uid = _as_number(user)
                if group is None:
                    raise ValueError(
                        f"user {user!r} has no passwd entry, so it has no primary "
                        "group: name a group as well"
                    )
            else:
                self._uid, self._gid, self.username = (
                    entry.pw_uid,
                    entry.pw_gid,
                    entry.pw_name,
                )
        if group is not None:
            self._gid = _resolve_group(group)

    @property
    def uid(self) -> int | None:
        """The uid to switch to (None: keep it)."""
        return self._uid

    @uid.setter
    def uid(self, value: Identity | None) -> None:
        if value is None:
            self._uid = None
            return
        entry = _lookup_user(value)
        self._uid = _as_number(value) if entry is None else entry.pw_uid

    @property
    def gid(self) -> int | None:
        """The gid to switch to (None: keep it)."""
        return self._gid

    @gid.setter
    def gid(self, value: Identity | None) -> None:
        self._gid = None if value is None else _resolve_group(value)

    @property
    def umask(self) -> int | None:
        """The umask to set (None: keep it)."""
        return self._umask

    @umask.setter
    def umask(self, value: int | str | None) -> None:
        if isinstance(value, str):
            try:
                value = int(value, 8)
            except ValueError:
                raise ValueError(
                    f"umask {value!r} is not an octal number such as '027'"
                ) from None
        self._umask = value

    def start(self) -> None:
        """Switch to the configured owner and umask, and log the result.

        Only the first start does anything (``finalized``): the process
        already is that owner after it.
        """
        if self.finalized:
            self.bus.log(
                f"Already running as uid={os.getuid()} gid={os.getgid()}.",
                level=logging.DEBUG,
            )
            return
        switching = self.uid is not None or self.gid is not None
        if switching:
            self._change_owner()
        if self.umask is not None:
            change_file_creation_mask(self.umask)
        self.finalized = True
        umask = "unchanged" if self.umask is None else f"{self.umask:03o}"
        if not switching:
            self.bus.log(
                f"Running as uid={os.getuid()} gid={os.getgid()}, umask={umask}"
            )
            return
        groups = ",".join(str(g) for g in os.getgroups())
        self.bus.log(
            f"Dropped privileges to uid={os.getuid()} gid={os.getgid()} "
            f"groups={groups} umask={umask}"
        )

    start.priority = START_PRIORITY  # type: ignore[attr-defined]

    def _change_owner(self) -> None:
        uid = os.getuid() if self.uid is None else self.uid
        gid = os.getgid() if self.gid is None else self.gid
        if os.geteuid() != 0:
            if (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) == (
                uid,
                uid,
                gid,
                gid,
            ):
                return  # already there, e.g. systemd's User= did it for us
            raise PermissionError(
                f"cannot switch to {self._target(uid, gid)}: this process runs "
                f"as uid {os.geteuid()}, not root; start it as root, or drop "
                "user/group from the configuration"
            )
        if self.username is not None:
            os.initgroups(self.username, gid)  # busd's user=: the user's groups
        elif self.group is not None:
            os.setgroups([gid])  # busd's group= alone
        elif self.gid is not None:
            os.setgroups([])  # CherryPy's gid=
        # python-daemon's setgid then setuid (an unset one is the current id,
        # so setting it changes nothing); groups were settled above.
        change_process_owner(uid, gid, initgroups=False)

    def _target(self, uid: int, gid: int) -> str:
        if self.user is not None:
            return f"user {self.user!r} (uid={uid}, gid={gid})"
        if self.group is not None:
            return f"group {self.group!r} (gid={gid})"
        return f"uid={uid}, gid={gid}"


def _lookup_user(user: Identity) -> pwd.struct_passwd | None:
    """The passwd entry for a name or number; None for an unknown number."""
    if isinstance(user, bytes):
        user = os.fsdecode(user)
    if isinstance(user, int):
        try:
            return pwd.getpwuid(user)
        except KeyError:
            return None
    try:
        return pwd.getpwnam(user)
    except KeyError:
        if user.isdigit():
            return _lookup_user(int(user))
        raise UnknownNameError(f"unknown user {user!r}") from None


def _resolve_group(group: Identity) -> int:
    if isinstance(group, bytes):
        group = os.fsdecode(group)
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise UnknownNameError(f"unknown group {group!r}") from None


def _as_number(value: Identity) -> int:
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    return value if isinstance(value, int) else int(value)
