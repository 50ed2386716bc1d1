"""Give up root once the privileged work of starting is done.

Order matters and is irreversible: supplementary groups first, then the
gid, then the uid (after ``setuid`` the process may no longer change its
groups). The actual calls go through python-daemon's
``change_process_owner`` and ``change_file_creation_mask``.
"""

from __future__ import annotations

import grp
import os
import pwd
from typing import TYPE_CHECKING

from daemon.daemon import change_file_creation_mask, change_process_owner

from busd.plugins.base import SimplePlugin

if TYPE_CHECKING:
    from busd.bus import Bus

__all__ = ["DropPrivileges"]

# After the PID file (70) and the control socket (75), which need root to
# be created in /run and to give the socket its group; before brokers are
# spawned, so that they never run as root.
START_PRIORITY = 77


class DropPrivileges(SimplePlugin):
    """At ``start``, switch to ``user``/``group`` and set the ``umask``.

    ``user`` and ``group`` are names or numbers; unknown names raise
    ValueError here, at construction, rather than halfway through starting.
    With a user, the supplementary groups become that user's groups and the
    gid defaults to the user's primary group; with only a group, the
    supplementary groups become just that group. ``umask`` is an int or an
    octal string such as ``"027"``.

    Changing owner needs root. A process that is not root but already runs
    as the requested uid and gid (say, started by systemd with ``User=``)
    carries on; otherwise ``start`` raises PermissionError naming the user.
    """

    def __init__(
        self,
        bus: Bus,
        user: str | int | None = None,
        group: str | int | None = None,
        umask: int | str | None = None,
    ) -> None:
        super().__init__(bus)
        self.user = user
        self.group = group
        self.uid: int | None = None
        self.gid: int | None = None
        #: The user name whose groups become the supplementary groups (only
        #: when ``user`` is given and has a passwd entry).
        self.username: str | None = None
        if user is not None:
            entry = _lookup_user(user)
            if entry is None:
                # A bare number without a passwd entry: fine for the uid,
                # but there is no primary group to fall back on.
                self.uid = _as_number(user)
                if group is None:
                    raise ValueError(
                        f"user {user!r} has no passwd entry, so it has no primary "
                        "group: name a group as well"
                    )
            else:
                self.uid, self.gid, self.username = (
                    entry.pw_uid,
                    entry.pw_gid,
                    entry.pw_name,
                )
        if group is not None:
            self.gid = _resolve_group(group)
        self.umask = int(umask, 8) if isinstance(umask, str) else umask

    def start(self) -> None:
        """Switch to the configured owner and umask, and log the result.

        Running again (a later start of the same bus) is harmless: the
        process already is that owner.
        """
        switching = self.uid is not None or self.gid is not None
        if switching:
            self._change_owner()
        if self.umask is not None:
            change_file_creation_mask(self.umask)
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
            if self.user is not None:
                target = f"user {self.user!r} (uid={uid}, gid={gid})"
            else:
                target = f"group {self.group!r} (gid={gid})"
            raise PermissionError(
                f"cannot switch to {target}: this process runs as uid "
                f"{os.geteuid()}, not root; start it as root, or drop "
                "user/group from the configuration"
            )
        # python-daemon's initgroups path skips setgid(), so the
        # supplementary groups are set here and change_process_owner does
        # gid then uid.
        if self.username is not None:
            os.initgroups(self.username, gid)
        else:
            os.setgroups([gid])
        change_process_owner(uid, gid, initgroups=False)


def _lookup_user(user: str | int) -> pwd.struct_passwd | None:
    """The passwd entry for a name or number; None for an unknown number."""
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
        raise ValueError(f"unknown user {user!r}") from None


def _resolve_group(group: str | int) -> int:
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise ValueError(f"unknown group {group!r}") from None


def _as_number(value: str | int) -> int:
    return value if isinstance(value, int) else int(value)
