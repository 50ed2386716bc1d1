"""The control socket: who is calling, which frames they sent, which op runs.

``ControlServer`` is a bus plugin. On ``start`` (while still root, before
privileges are dropped) it binds the Unix socket and starts an asyncio
event loop on its own thread; every client connection lives on that loop.
A connection reads bytes, cuts them into frames with the shared
:class:`~busd.protocol.FrameDecoder`, and runs each request as a task, so
several requests can be in flight and are answered as they complete.

Nothing a client sends can stop the server: a bad frame gets a typed error
(and, when the byte stream can't be trusted any more, the connection is
closed); an op that raises is answered ``internal`` with an id to find the
traceback in the log. A client that never reads its answers is cut off
once its unsent output passes a bound, with a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import itertools
import logging
import os
import pwd
import socket
import stat
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from busd.plugins.base import SimplePlugin
from busd.protocol import (
    ErrorCode,
    FrameDecoder,
    ProtocolError,
    encode_frame,
    error_reply,
    ok_reply,
    parse_request,
)

log = logging.getLogger("busd.control")

# Bind after the PID file (70) and before privileges are dropped (77): the
# socket's directory and group ownership may need root.
BIND_PRIORITY = 75
# Close late on stop, so that clients following events see the shutdown.
CLOSE_PRIORITY = 90

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
READ_CHUNK = 256 * 1024

READ = "read"
WRITE = "write"


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection, from the kernel (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]

    def __str__(self) -> str:
        return f"pid {self.pid} uid {self.uid}"


@dataclass(frozen=True)
class AccessPolicy:
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


@dataclass(frozen=True)
class Op:
    """One control operation: its coroutine, the access it needs, and
    whether it answers with a stream of events after its result."""

    # Returns the result, or an awaitable of it when the op must wait.
    handler: Callable[[RequestContext, dict[str, Any]], Any]
    access: str
    stream: bool = False


@dataclass(frozen=True)
class ServerSettings:
    """What the control server needs from the configuration."""

    path: str
    mode: int = 0o660
    gid: int = -1
    max_frame: int = 1 << 20
    max_clients: int = 1024
    # A client that sends part of a frame then goes quiet this long is cut off.
    frame_timeout: float = 10.0
    # Unsent bytes to a client before it is cut off as a hopeless reader.
    max_output: int = 8 << 20


class ControlServer(SimplePlugin):
    """Serves the control protocol on a Unix socket (a bus plugin)."""

    def __init__(
        self,
        bus: Any,
        settings: ServerSettings,
        ops: dict[str, Op],
        policy: AccessPolicy | None = None,
    ) -> None:
        super().__init__(bus)
        self.settings = settings
        self.ops = ops
        self.policy = policy or AccessPolicy()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.connections: set[Connection] = set()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._ids = itertools.count(1)

    # -- bus listeners -----------------------------------------------------

    def start(self) -> None:
        """Bind the socket and start serving on the I/O thread."""
        self._listener = bind_unix_socket(self.settings)
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run_loop, args=(ready,), name="busd-io", daemon=True
        )
        self._thread.start()
        ready.wait()
        future = asyncio.run_coroutine_threadsafe(self._serve(), self.loop)
        future.result()
        log.info("Listening on %s", self.settings.path)

    start.priority = BIND_PRIORITY

    def stop(self) -> None:
        """Close every connection and the socket; stop the I/O thread."""
        if self.loop is None:
            return
        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self.loop.close()
        self.loop = None
        try:
            os.unlink(self.settings.path)
        except FileNotFoundError:
            pass
        except PermissionError as error:
            # Bound as root, then privileges dropped: the directory may not
            # let us remove it. The next busd replaces a stale socket anyway.
            log.warning("Cannot remove %s: %s", self.settings.path, error.strerror)
        log.info("Closed %s", self.settings.path)

    stop.priority = CLOSE_PRIORITY

    # -- the I/O thread ----------------------------------------------------

    def _run_loop(self, ready: threading.Event) -> None:
        assert self.loop is not None
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(ready.set)
        self.loop.run_forever()

    async def _serve(self) -> None:
        # asyncio listens again on the socket with its own backlog (100 by
        # default): pass ours, or a burst of connects fails with EAGAIN.
        self._server = await asyncio.start_unix_server(
            self._accept,
            sock=self._listener,
            limit=READ_CHUNK,
            backlog=listen_backlog(self.settings),
        )

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.close()
        if self._server is not None:
            await self._server.wait_closed()

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` on the I/O loop, from any thread."""
        if self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closing
                self.loop.call_soon_threadsafe(callback, *args)

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = peer_of(writer.get_extra_info("socket"))
        connection = Connection(self, reader, writer, peer, next(self._ids))
        if len(self.connections) >= self.settings.max_clients:
            log.warning(
                "Refusing client %s: %d connections already open",
                peer,
                len(self.connections),
            )
            connection.send(
                error_reply(None, ErrorCode.BUSY, "too many clients; try again later")
            )
            connection.close()
            return
        self.connections.add(connection)
        try:
            await connection.serve()
        finally:
            self.connections.discard(connection)


class Connection:
    """One client: its frames in, its answers and stream events out."""

    def __init__(
        self,
        server: ControlServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: Peer,
        number: int,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.number = number
        self.closed = False
        # Stream id -> cleanup callback, run when the stream ends.
        self.streams: dict[Any, Callable[[], None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        """Read frames until the client leaves or breaks the protocol."""
        settings = self.server.settings
        decoder = FrameDecoder(settings.max_frame)
        try:
            while not self.closed:
                timeout = settings.frame_timeout if decoder.pending else None
                try:
                    data = await asyncio.wait_for(self.reader.read(READ_CHUNK), timeout)
                except TimeoutError:
                    self._refuse(
                        ProtocolError(
                            ErrorCode.BAD_REQUEST,
                            f"incomplete frame: no data for {settings.frame_timeout:g}"
                            " s; closing the connection",
                            fatal=True,
                        )
                    )
                    break
                if not data:
                    break
                try:
                    messages = decoder.feed(data)
                except ProtocolError as error:
                    self._refuse(error)
                    break
                for message in messages:
                    if isinstance(message, ProtocolError):
                        self.send(error_reply(None, message.code, message.message))
                    else:
                        self._start_request(message)
        except (ConnectionError, OSError):
            pass  # the client went away; nothing to answer
        finally:
            self.close()

    def _refuse(self, error: ProtocolError) -> None:
        log.warning("Closing client %s: %s", self.peer, error.message)
        self.send(error_reply(None, error.code, error.message))

    def _start_request(self, message: dict[str, Any]) -> None:
        """Run one request: answered at once, or by a task if it must wait.

        Most ops finish without waiting (ping, state, a publish); running
        them inline saves a task and a loop turn per request, and keeps
        answers in request order. An op that returns an awaitable (publish
        --wait, broker lifecycle) is finished by a task meanwhile.
        """
        request_id = message.get("id")
        try:
            request_id, op_name, arguments = parse_request(message)
            op = self._check(request_id, op_name)
            result = op.handler(RequestContext(self, request_id), arguments)
        except ProtocolError as error:
            self.send(error_reply(_safe_id(request_id), error.code, error.message))
            return
        except Exception:
            self._internal_error(request_id)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(self._finish(request_id, result))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self.send(ok_reply(request_id, result))

    def _check(self, request_id: Any, op_name: str) -> Op:
        """The op to run, if it exists and this peer may run it."""
        op = self.server.ops.get(op_name)
        if op is None:
            known = ", ".join(sorted(self.server.ops))
            raise ProtocolError(
                ErrorCode.UNKNOWN_OP, f"unknown op {op_name!r} (known: {known})"
            )
        if not self.server.policy.allows(self.peer, op.access):
            log.warning("Refused %r to client %s", op_name, self.peer)
            raise ProtocolError(
                ErrorCode.PERMISSION_DENIED,
                f"uid {self.peer.uid} may not run {op_name!r} ({op.access} access)",
            )
        if op.stream and request_id in self.streams:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"a stream with id {request_id!r} is open"
            )
        return op

    async def _finish(self, request_id: Any, pending: Awaitable[Any]) -> None:
        try:
            result = await pending
        except ProtocolError as error:
            self.send(error_reply(_safe_id(request_id), error.code, error.message))
        except asyncio.CancelledError:
            raise
        except Exception:
            self._internal_error(request_id)
        else:
            self.send(ok_reply(request_id, result))

    def _internal_error(self, request_id: Any) -> None:
        incident = f"{os.getpid()}-{self.number}-{_safe_id(request_id)}"
        log.exception("Internal error %s in a request from %s", incident, self.peer)
        self.send(
            error_reply(
                _safe_id(request_id),
                ErrorCode.INTERNAL,
                f"internal error {incident}; busd's log has the details",
            )
        )

    def send(self, message: dict[str, Any]) -> None:
        """Queue ``message`` for the client; cut off a client that never reads."""
        if self.closed or self.writer.transport.is_closing():
            # The client is gone and serve() has not noticed yet: writing
            # would only make asyncio log "socket.send() raised exception."
            return
        try:
            frame = encode_frame(message)
        except ProtocolError as error:
            # Only a bug can get here: ops return msgpack-able results.
            log.error("Cannot encode an answer to %s: %s", self.peer, error.message)
            frame = encode_frame(
                error_reply(message.get("id"), ErrorCode.INTERNAL, error.message)
            )
        self.writer.write(frame)
        waiting = self.writer.transport.get_write_buffer_size()
        if waiting > self.server.settings.max_output:
            log.warning(
                "Disconnecting client %s: it does not read its answers "
                "(%d bytes waiting)",
                self.peer,
                waiting,
            )
            self.writer.transport.abort()
            self.close()

    def open_stream(self, stream_id: Any, cleanup: Callable[[], None]) -> None:
        """Register a stream so that ``cancel`` or a disconnect ends it."""
        self.streams[stream_id] = cleanup

    def end_stream(self, stream_id: Any) -> bool:
        """End one stream; False when no stream has that id."""
        cleanup = self.streams.pop(stream_id, None)
        if cleanup is None:
            return False
        cleanup()
        return True

    def close(self) -> None:
        """End every stream and task of this client and close its socket."""
        if self.closed:
            return
        self.closed = True
        for stream_id in list(self.streams):
            self.end_stream(stream_id)
        for task in list(self._tasks):
            task.cancel()
        self.writer.close()


@dataclass
class RequestContext:
    """What an op handler gets besides its arguments."""

    connection: Connection
    request_id: Any
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def peer(self) -> Peer:
        """The calling process."""
        return self.connection.peer

    def emit(self, event: Any) -> None:
        """Send one stream event for this request."""
        self.connection.send({"id": self.request_id, "event": event})

    def open_stream(self, cleanup: Callable[[], None]) -> None:
        """Keep this request's stream open until cancelled or disconnected."""
        self.connection.open_stream(self.request_id, cleanup)


def _safe_id(request_id: Any) -> Any:
    if isinstance(request_id, bool) or not isinstance(request_id, int | str):
        return None
    return request_id


def peer_of(sock: socket.socket) -> Peer:
    """The credentials of the process at the other end of ``sock``."""
    pid, uid, gid = struct.unpack(
        "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    )
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 1024)
        groups = frozenset(struct.unpack(f"{len(raw) // 4}I", raw))
    except OSError:
        # Older kernels: the groups the user database gives that user.
        try:
            name = pwd.getpwuid(uid).pw_name
            groups = frozenset(os.getgrouplist(name, gid))
        except KeyError:
            groups = frozenset()
    return Peer(pid, uid, gid, groups)


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
