"""The control server: the socket busctl talks to, served on the I/O loop.

``ControlServer`` is a bus plugin. On ``start`` (while still root, before
privileges are dropped) it binds the Unix socket and serves it on busd's
I/O loop (busd/ioloop.py); every client is a
:class:`~busd.control.connection.Connection` there. An op that must wait
(publish --wait, broker lifecycle) is finished later, so several requests
can be in flight and are answered as they complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
from typing import Any

from busd.control.access import AccessPolicy
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
    ) -> None:
        super().__init__(bus)
        self.ioloop = ioloop
        self.settings = settings
        self.ops = ops
        self.policy = policy or AccessPolicy()
        #: Shared with every connection; made at start (it needs the outbox).
        self.state: ServerState | None = None
        self._listener: socket.socket | None = None
        self._server: asyncio.AbstractServer | None = None
        self._ids = itertools.count(1)

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
        """Bind the socket and serve it on the I/O loop."""
        self._listener = bind_unix_socket(self.settings)
        self.state = ServerState(
            self.settings, self.policy, self.ops, self.ioloop.outbox
        )
        self.ioloop.run(self._serve(self._listener, self.state))
        log.info("Listening on %s", self.settings.path)

    start.priority = BIND_PRIORITY  # type: ignore[attr-defined]

    def stop(self) -> None:
        """Close every connection and the socket."""
        if self.state is None:
            return
        if self.ioloop.running:
            with contextlib.suppress(RuntimeError, TimeoutError):
                self.ioloop.run(self._close(self.state), timeout=10)
        self.state = None
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

    # -- on the I/O loop ---------------------------------------------------

    async def _serve(self, listener: socket.socket, state: ServerState) -> None:
        loop = asyncio.get_running_loop()
        # asyncio listens again on the socket with its own backlog (100 by
        # default): pass ours, or a burst of connects fails with EAGAIN.
        self._server = await loop.create_unix_server(
            lambda: Connection(state, next(self._ids)),
            sock=listener,
            backlog=listen_backlog(self.settings),
        )

    async def _close(self, state: ServerState) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(state.connections):
            connection.close()
        if self._server is not None:
            await self._server.wait_closed()
