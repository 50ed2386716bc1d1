"""The control socket handed over by systemd (socket activation).

With a socket unit (systemd/busd.socket), systemd binds and listens on the
control socket itself and starts busd at the first connection, passing the
listening socket as an open file descriptor. The protocol (sd_listen_fds(3))
is three environment variables:

``LISTEN_PID``
    the PID the descriptors are for; any other process ignores them (they
    leaked into its environment from a parent).
``LISTEN_FDS``
    how many descriptors were passed; they are 3, 4, ... in order.
``LISTEN_FDNAMES``
    their names, colon-separated (``FileDescriptorName=`` in the socket
    unit, else the unit's name).

busd takes the descriptor named ``control``, or the only one passed.
:func:`take_control_socket` reads the variables once and removes them from
``os.environ`` whatever they say, so the fork server and the workers never
see them (a worker that speaks the protocol would take busd's socket).
The protocol is a few lines of standard library, so no libsystemd binding
is needed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat

# ``busd run`` calls this before it starts the fork server: typing's import
# (a few ms) would delay that start, as in busd/spawner.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import MutableMapping

log = logging.getLogger("busd.control")

__all__ = [
    "ACTIVATION_ENVIRONMENT",
    "CONTROL_NAME",
    "FIRST_FD",
    "ActivationError",
    "InheritedSocket",
    "take_control_socket",
]

#: The variables of the protocol, removed from the environment once read.
ACTIVATION_ENVIRONMENT = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
#: The first descriptor passed (SD_LISTEN_FDS_START).
FIRST_FD = 3
#: The name busd looks for among several descriptors (``FileDescriptorName=``).
CONTROL_NAME = "control"


class ActivationError(RuntimeError):
    """systemd passed descriptors busd cannot serve as its control socket."""


class InheritedSocket:
    """The listening control socket systemd passed, and what it is."""

    __slots__ = ("fd", "name", "path", "sock")

    def __init__(self, sock: socket.socket, path: str, name: str, fd: int) -> None:
        self.sock = sock
        #: Its path in the file system (systemd's ``ListenStream=``).
        self.path = path
        #: Its name in ``LISTEN_FDNAMES`` ("" when systemd gave none).
        self.name = name
        #: Its descriptor number as passed (3 for the first).
        self.fd = fd


def take_control_socket(
    environ: MutableMapping[str, str] | None = None,
    pid: int | None = None,
    first_fd: int = FIRST_FD,
) -> InheritedSocket | None:
    """The control socket systemd passed to this process, or None.

    None when the variables are absent, or name another PID (they were
    inherited from a parent, and are not ours). The variables are removed
    from ``environ`` (default ``os.environ``) in every case. The socket is
    checked (a listening ``AF_UNIX`` ``SOCK_STREAM`` socket on a path),
    made close-on-exec and non-blocking; the other descriptors passed are
    closed. ``pid`` and ``first_fd`` are for tests: this process's PID and 3.

    Raises ActivationError naming the variable or descriptor at fault.
    """
    environ = os.environ if environ is None else environ
    values = {name: environ.pop(name, None) for name in ACTIVATION_ENVIRONMENT}
    listen_pid, listen_fds, listen_names = values.values()
    if listen_pid is None or listen_fds is None:
        return None
    if _number("LISTEN_PID", listen_pid) != (os.getpid() if pid is None else pid):
        return None
    count = _number("LISTEN_FDS", listen_fds)
    if count == 0:
        return None
    fds = list(range(first_fd, first_fd + count))
    names = _names(listen_names, count)
    chosen = _choose(fds, names)
    inherited = _listening_socket(chosen, names[fds.index(chosen)])
    for fd, name in zip(fds, names, strict=True):
        if fd != chosen:
            log.info("Closing fd %d (%s) from systemd: not busd's", fd, name)
            _close_quietly(fd)
    return inherited


def _number(variable: str, value: str) -> int:
    # isascii: "²" is a digit to isdigit(), not to int().
    digits = value.isascii() and value.isdigit()
    if not digits or (variable == "LISTEN_PID" and int(value) == 0):
        kind = "a PID" if variable == "LISTEN_PID" else "a count"
        raise ActivationError(f"{variable}={value!r} is not {kind}")
    return int(value)


def _names(value: str | None, count: int) -> list[str]:
    """One name per descriptor ("" for each when systemd gave none)."""
    if value is None:
        return [""] * count
    names = value.split(":")
    if len(names) != count:
        raise ActivationError(
            f"LISTEN_FDNAMES={value!r} names {len(names)} descriptor"
            f"{'s' * (len(names) != 1)}, but LISTEN_FDS={count}"
        )
    return names


def _choose(fds: list[int], names: list[str]) -> int:
    """The descriptor named ``control``, else the only one passed."""
    named = [fd for fd, name in zip(fds, names, strict=True) if name == CONTROL_NAME]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise ActivationError(
            f"systemd passed {len(named)} descriptors named {CONTROL_NAME!r} "
            f"(fds {', '.join(map(str, named))}); give only one "
            f"FileDescriptorName={CONTROL_NAME}"
        )
    if len(fds) == 1:
        return fds[0]
    pairs = zip(fds, names, strict=True)
    listed = ", ".join(f"{fd} ({name or 'unnamed'})" for fd, name in pairs)
    raise ActivationError(
        f"systemd passed {len(fds)} descriptors and none is named "
        f"{CONTROL_NAME!r}: {listed}; set FileDescriptorName={CONTROL_NAME} on "
        "busd's control socket in its socket unit"
    )


def _listening_socket(fd: int, name: str) -> InheritedSocket:
    """``fd`` as a socket, once checked to be one busd can serve."""
    what = f"fd {fd}" + (f" ({name})" if name else "") + " from systemd"
    try:
        mode = os.fstat(fd).st_mode
    except OSError as error:
        raise ActivationError(f"{what} is not open: {error.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ActivationError(
            f"{what} is a {_file_kind(mode)}, not a socket; busd needs "
            "ListenStream=PATH in its socket unit"
        )
    sock = socket.socket(fileno=fd)  # detects the family and type
    try:
        problem = _problem(sock)
        if problem:
            raise ActivationError(f"{what} is {problem}")
        path = sock.getsockname()
        if not isinstance(path, str) or not path.startswith("/"):
            raise ActivationError(
                f"{what} is not bound to a path in the file system "
                f"({path!r}); busd needs ListenStream=/PATH"
            )
    except BaseException:
        sock.close()
        raise
    # Python's own sockets are close-on-exec; a passed one is not: no
    # program a worker execs may hold busd's socket.
    sock.set_inheritable(False)
    sock.setblocking(False)
    return InheritedSocket(sock, path, name, fd)


def _problem(sock: socket.socket) -> str:
    """What makes ``sock`` unfit for the control socket ("" when fit)."""
    if sock.family != socket.AF_UNIX:
        return f"an {sock.family.name} socket; busd's control socket is AF_UNIX"
    if sock.type != socket.SOCK_STREAM:
        return f"a {sock.type.name} socket; busd needs ListenStream= (SOCK_STREAM)"
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return "a socket that is not listening; set Accept=no in the socket unit"
    return ""


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO (pipe)"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return kind
    return "file of another kind"


def _close_quietly(fd: int) -> None:
    # A descriptor systemd said it passed but that is not open: nothing to do.
    with contextlib.suppress(OSError):
        os.close(fd)
