"""The control server: the socket busctl talks to, served on the I/O loop.

``ControlServer`` is a bus plugin. On ``start`` (while still root, before
privileges are dropped) it binds the Unix socket and serves it on busd's
I/O loop (busd/ioloop.py); every client is a
:class:`~busd.control.connection.Connection` there. An op that must wait
(publish --wait, broker lifecycle) is finished later, so several requests
can be in flight and are answered as they complete.

Given the socket systemd passed (busd/control/activation.py), it serves
that one instead: the file is then systemd's (its path, mode, group and
life), so the server neither binds nor removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import sys
from typing import Any

from busd.control.access import AccessPolicy
from busd.control.activation import InheritedSocket
from busd.control.connection import Connection
from busd.control.requests import Op
from busd.control.settings import ServerSettings
from busd.control.shared import ServerState
from busd.control.socket import bind_unix_socket, listen_backlog
from busd.ioloop import IOLoop
from busd.plugins.base import SimplePlugin

log = logging.getLogger("busd.control")

# Bind after the PID file (70) and before privileges are dropped (77): the
# socket's directory and group ownership may need root.
BIND_PRIORITY = 75
# Close late on stop, so that clients following events see the shutdown.
CLOSE_PRIORITY = 90


class ControlServer(SimplePlugin):
    """Serves the control protocol on a Unix socket (a bus plugin)."""

    def __init__(
        self,
        bus: Any,
        ioloop: IOLoop,
        settings: ServerSettings,
        ops: dict[str, Op],
        policy: AccessPolicy | None = None,
        inherited: InheritedSocket | None = None,
    ) -> None:
        """``inherited``: the listening socket systemd passed, served instead
        of binding ``settings.path``."""
        super().__init__(bus)
        self.ioloop = ioloop
        self.settings = settings
        self.ops = ops
        self.policy = policy or AccessPolicy()
        self.inherited = inherited
        #: Shared with every connection; made at start (it needs the outbox).
        self.state: ServerState | None = None
        self._listener: socket.socket | None = None
        self._server: asyncio.AbstractServer | None = None
        self._ids = itertools.count(1)

    @property
    def path(self) -> str:
        """The path clients connect to: systemd's socket when it passed one."""
        return self.settings.path if self.inherited is None else self.inherited.path

    @property
    def clients(self) -> int:
        """How many clients are connected."""
        return 0 if self.state is None else len(self.state.connections)

    def apply(self, settings: ServerSettings, policy: AccessPolicy) -> None:
        """A reload's settings and policy, for every connection from now on.

        The socket's path, mode and group stay as bound.
        """
        self.settings, self.policy = settings, policy
        if self.state is not None:
            self.state.settings, self.state.policy = settings, policy

    # -- bus listeners -----------------------------------------------------

    def start(self) -> None:
        """Bind the socket (or take systemd's) and serve it on the I/O loop."""
        if self.inherited is None:
            self._listener = bind_unix_socket(self.settings)
        else:
            self._listener = self.inherited.sock
            self._log_inherited(self.inherited)
        self.state = ServerState(
            self.settings, self.policy, self.ops, self.ioloop.outbox
        )
        self.ioloop.run(self._serve(self._listener, self.state))
        log.info("Listening on %s", self.path)

    start.priority = BIND_PRIORITY  # type: ignore[attr-defined]

    def stop(self) -> None:
        """Close every connection and the socket."""
        if self.state is None:
            return
        if self.ioloop.running:
            with contextlib.suppress(RuntimeError, TimeoutError):
                self.ioloop.run(self._close(self.state), timeout=10)
        self.state = None
        if self.inherited is not None:
            # systemd's socket unit keeps listening: the next client starts
            # busd again. Its file is systemd's to remove.
            log.info("Closed %s (systemd keeps it listening)", self.path)
            return
        try:
            os.unlink(self.settings.path)
        except FileNotFoundError:
            pass
        except PermissionError as error:
            # Bound as root, then privileges dropped: the directory may not
            # let us remove it. The next busd replaces a stale socket anyway.
            log.warning("Cannot remove %s: %s", self.settings.path, error.strerror)
        log.info("Closed %s", self.settings.path)

    stop.priority = CLOSE_PRIORITY  # type: ignore[attr-defined]

    def _log_inherited(self, inherited: InheritedSocket) -> None:
        name = f" ({inherited.name})" if inherited.name else ""
        log.info(
            "Control socket from systemd: fd %d%s, %s; its mode and group are "
            "the socket unit's (SocketMode=, SocketGroup=)",
            inherited.fd,
            name,
            inherited.path,
        )
        if inherited.path != self.settings.path:
            log.warning(
                "[busd] socket is %s but systemd passed %s%s: serving %s, the one "
                "clients reach; make the two paths the same",
                self.settings.path,
                inherited.path,
                name,
                inherited.path,
            )

    # -- on the I/O loop ---------------------------------------------------

    async def _serve(self, listener: socket.socket, state: ServerState) -> None:
        loop = asyncio.get_running_loop()
        # From Python 3.13 asyncio removes the socket's file when the server
        # closes; systemd's must stay (and stop() removes busd's own).
        keep_file: dict[str, Any] = (
            {"cleanup_socket": False} if sys.version_info >= (3, 13) else {}
        )
        # asyncio listens again on the socket with its own backlog (100 by
        # default): pass ours, or a burst of connects fails with EAGAIN.
        self._server = await loop.create_unix_server(
            lambda: Connection(state, next(self._ids)),
            sock=listener,
            backlog=listen_backlog(self.settings),
            **keep_file,
        )

    async def _close(self, state: ServerState) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(state.connections):
            connection.close()
        if self._server is not None:
            await self._server.wait_closed()
