"""The control socket's file: bound with the right mode and group, and a
dead daemon's stale socket replaced (a live one is never taken over)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat

from busd.control.settings import ServerSettings

log = logging.getLogger("busd.control")


class SocketInUse(RuntimeError):
    """Another live process already serves the control socket."""


def bind_unix_socket(settings: ServerSettings) -> socket.socket:
    """Bind and listen on ``settings.path``, replacing a dead daemon's socket.

    The file is created with no access for anyone but its owner, then given
    its mode and group, so there is no moment where it is wider than asked.
    """
    path = settings.path
    _remove_stale_socket(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as error:
        sock.close()
        raise OSError(
            error.errno, f"cannot bind control socket {path}: {error.strerror}"
        ) from None
    finally:
        os.umask(old_umask)
    os.chmod(path, settings.mode)
    if settings.gid >= 0:
        os.chown(path, -1, settings.gid)
    sock.listen(listen_backlog(settings))
    sock.setblocking(False)
    return sock


def listen_backlog(settings: ServerSettings) -> int:
    """Connections the kernel queues until busd accepts them."""
    return min(settings.max_clients, socket.SOMAXCONN)


def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketInUse(
            f"{path} exists and is not a socket; remove it or pick another path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as error:
        if error.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        log.info("Removing stale control socket %s (nobody answers)", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        raise SocketInUse(f"busd already running: {path} answers")
    finally:
        probe.close()
