"""The control socket: who is calling, which frames they sent, which op runs.

``ControlServer`` is a bus plugin. On ``start`` (while still root, before
privileges are dropped) it binds the Unix socket and starts an asyncio
event loop on its own thread; every client connection lives on that loop.
A connection is an :class:`asyncio.Protocol`: the bytes asyncio hands it are
cut into frames by the shared :class:`~busd.protocol.FrameDecoder`, and each
request runs at once; an op that must wait (publish --wait, broker
lifecycle) is finished by a task, so several requests can be in flight and
are answered as they complete.

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
import itertools
import logging
import os
import pwd
import socket
import stat
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from busd.outbox import Outbox
from busd.plugins.base import SimplePlugin
from busd.protocol import (
    ErrorCode,
    FrameDecoder,
    FrameEncoder,
    ProtocolError,
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

    # Returns the result, or when the op must wait a Pending (answered when
    # resolved) or a coroutine (answered by a task).
    handler: Callable[[RequestContext, dict[str, Any]], Any]
    access: str
    stream: bool = False


class Pending:
    """An op's answer that comes later, without a Task or a future.

    The op returns it; the connection attaches itself; the code that
    finishes the work calls ``resolve(value)`` (publish --wait: on the last
    broker's ack), and the client gets ``finish(value)``. A connection
    that closes first cancels it, and ``resolve`` then does nothing.
    """

    __slots__ = ("_connection", "_done", "_request_id", "_value", "finish")

    def __init__(self, finish: Callable[[Any], Any] | None = None) -> None:
        self.finish = finish
        self._connection: Connection | None = None
        self._request_id: Any = None
        self._value: Any = None
        self._done = False

    def resolve(self, value: Any) -> None:
        """The work is done: answer with ``finish(value)`` (once)."""
        if self._done:
            return
        self._done = True
        if self._connection is None:
            self._value = value  # resolved before attach(): answered then
        else:
            self._connection.answer_later(self, self._request_id, value)

    def attach(self, connection: Connection, request_id: Any) -> None:
        """Answer request ``request_id`` on ``connection`` when resolved."""
        self._connection, self._request_id = connection, request_id
        if self._done and self._value is not None:
            value, self._value = self._value, None
            connection.answer_later(self, request_id, value)

    def cancel(self) -> None:
        """Nobody waits any more: a later ``resolve`` does nothing."""
        self._done = True
        self._connection = None
        self._value = None


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
        #: Encodes every frame sent to clients (on the I/O loop only).
        self.encode = FrameEncoder()
        #: Gathers the writes of each loop turn (clients and workers).
        self.outbox: Outbox | None = None

    # -- bus listeners -----------------------------------------------------

    def start(self) -> None:
        """Bind the socket and start serving on the I/O thread."""
        self._listener = bind_unix_socket(self.settings)
        self.loop = asyncio.new_event_loop()
        self.outbox = Outbox(self.loop)
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
        assert self.loop is not None
        # asyncio listens again on the socket with its own backlog (100 by
        # default): pass ours, or a burst of connects fails with EAGAIN.
        self._server = await self.loop.create_unix_server(
            lambda: Connection(self, next(self._ids)),
            sock=self._listener,
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


class Connection(asyncio.Protocol):
    """One client: its frames in, its answers and stream events out.

    asyncio calls the methods below on the I/O loop: ``connection_made``
    once, ``data_received`` with each chunk of bytes the socket gave,
    ``connection_lost`` once at the end (the client left, or we closed).
    A request is answered inside the ``data_received`` that completed its
    frame, as a bare echo server would: no task and no extra loop turn
    between a request and its answer unless its op must wait.

    What a StreamReader loop did for us is done here by hand: a frame
    left half-sent is cut off by a timer (``_watch_half_frame``), and a
    client that does not read its answers is cut off by ``send``. Reading
    never needs pausing: every chunk is decoded at once, and the decoder
    buffers at most one frame (``max_frame``).
    """

    transport: asyncio.Transport | None = None
    peer: Peer  # from the socket, in connection_made (the first call)

    def __init__(self, server: ControlServer, number: int) -> None:
        self.server = server
        self.number = number
        self.closed = False
        # Stream id -> cleanup callback, run when the stream ends.
        self.streams: dict[Any, Callable[[], None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Answers that come later (publish --wait), cancelled on close.
        self._waiting: set[Pending] = set()
        # Encoded frames for the client, written by the outbox (write_queued).
        self._outgoing: list[bytes] = []
        self._outgoing_size = 0
        # Bytes the transport had not sent yet after the last write.
        self._unsent = 0
        # What the access policy allows this peer (see _may).
        self._policy: AccessPolicy | None = None
        self._allowed: dict[str, bool] = {}
        self._decoder = FrameDecoder(server.settings.max_frame)
        assert server.outbox is not None, "the server is not started"
        self.outbox = server.outbox
        self._frame_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Learn who called; refuse them if busd has max_clients already."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = peer_of(transport.get_extra_info("socket"))
        connections = self.server.connections
        if len(connections) >= self.server.settings.max_clients:
            log.warning(
                "Refusing client %s: %d connections already open",
                self.peer,
                len(connections),
            )
            self.send(
                error_reply(None, ErrorCode.BUSY, "too many clients; try again later")
            )
            self.close()
            return
        connections.add(self)

    def data_received(self, data: bytes) -> None:
        """Decode the frames ``data`` completes and run their requests."""
        if self.closed:
            return
        try:
            messages = self._decoder.feed(data)
        except ProtocolError as error:  # fatal: the byte stream is lost
            self._refuse(error)
            return
        # The answers and deliveries of this read leave together, at its end.
        with self.outbox.hold():
            for message in messages:
                if self.closed:  # cut off by send() as a client that does not read
                    return
                if isinstance(message, ProtocolError):
                    self.send(error_reply(None, message.code, message.message))
                else:
                    self._start_request(message)
        self._watch_half_frame()

    def eof_received(self) -> bool:
        """The client shut down its sending side: close (connection_lost follows)."""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """The socket is closed: end the streams and tasks, forget the client."""
        self.close()
        self.server.connections.discard(self)

    # -- requests --------------------------------------------------------------

    def _watch_half_frame(self) -> None:
        """Give a half-received frame ``frame_timeout`` more seconds to finish.

        Called after each chunk of data, so the timer restarts whenever
        bytes arrive; a client that goes quiet mid-frame is cut off.
        """
        if self._frame_timer is not None:
            self._frame_timer.cancel()
            self._frame_timer = None
        if self._decoder.pending and not self.closed:
            self._frame_timer = asyncio.get_running_loop().call_later(
                self.server.settings.frame_timeout, self._frame_timed_out
            )

    def _frame_timed_out(self) -> None:
        self._frame_timer = None
        self._refuse(
            ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"incomplete frame: no data for "
                f"{self.server.settings.frame_timeout:g} s; closing the connection",
                fatal=True,
            )
        )

    def _refuse(self, error: ProtocolError) -> None:
        """Answer a fatal protocol error, then close the connection."""
        log.warning("Closing client %s: %s", self.peer, error.message)
        self.send(error_reply(None, error.code, error.message))
        self.close()

    def _start_request(self, message: dict[str, Any]) -> None:
        """Run one request: answered at once, or by a task if it must wait.

        Most ops finish without waiting (ping, state, a publish); running
        them inline saves a task and a loop turn per request, and keeps
        answers in request order. An op that returns a Pending (publish
        --wait) is answered when it resolves; one that returns a coroutine
        (broker lifecycle) is finished by a task meanwhile.
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
        if isinstance(result, Pending):
            # No Task (and its loop turns) for each publish --wait.
            self._waiting.add(result)
            result.attach(self, request_id)
        elif asyncio.iscoroutine(result):
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
        if not self._may(op.access):
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

    def _may(self, level: str) -> bool:
        """Whether this peer may run ops of ``level``, under today's policy.

        Worked out once per policy (a reload brings a new one), not once
        per request: the peer does not change.
        """
        policy = self.server.policy
        if policy is not self._policy:
            self._policy = policy
            self._allowed = {
                lvl: policy.allows(self.peer, lvl) for lvl in (READ, WRITE)
            }
        return self._allowed[level]

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

    def answer_later(self, pending: Pending, request_id: Any, value: Any) -> None:
        """Answer a request whose op returned a Pending, as ``_finish`` would."""
        self._waiting.discard(pending)
        try:
            result = value if pending.finish is None else pending.finish(value)
        except ProtocolError as error:
            self.send(error_reply(_safe_id(request_id), error.code, error.message))
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
        if self.closed or self.transport is None:
            return
        try:
            frame = self.server.encode(message)
        except ProtocolError as error:
            # Only a bug can get here: ops return msgpack-able results.
            log.error("Cannot encode an answer to %s: %s", self.peer, error.message)
            frame = self.server.encode(
                error_reply(message.get("id"), ErrorCode.INTERNAL, error.message)
            )
        # Answers leave in one write per read or loop turn (the outbox), not
        # one each: a window of publishes is answered by one write.
        if not self._outgoing:
            self.outbox.add(self, answer=True)
        self._outgoing.append(frame)
        self._outgoing_size += len(frame)
        # What the socket still holds is asked once per write (write_queued).
        if self._outgoing_size + self._unsent > self.server.settings.max_output:
            log.warning(
                "Disconnecting client %s: it does not read its answers "
                "(%d bytes waiting)",
                self.peer,
                self._outgoing_size + self._unsent,
            )
            self._outgoing.clear()
            self._outgoing_size = 0
            self.transport.abort()
            self.close()

    def write_queued(self) -> None:
        """Write the answers and events queued, joined (for the outbox)."""
        if not self._outgoing:
            return
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        self._outgoing_size = 0
        transport = self.transport
        if transport is not None and not transport.is_closing():
            # The client is gone and connection_lost has not come yet:
            # writing would only make asyncio log "socket.send() raised
            # exception."
            transport.write(data)
            self._unsent = transport.get_write_buffer_size()

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
        """End every stream and task of this client and close its socket.

        What is already queued for the client is still sent before the
        socket closes (a refusal, say).
        """
        if self.closed:
            return
        self.closed = True
        if self._frame_timer is not None:
            self._frame_timer.cancel()
        for stream_id in list(self.streams):
            self.end_stream(stream_id)
        for task in list(self._tasks):
            task.cancel()
        for pending in list(self._waiting):
            pending.cancel()
        if self.transport is not None:
            self.write_queued()  # a refusal queued just now still goes out
            self.transport.close()


class RequestContext:
    """What an op handler gets besides its arguments."""

    __slots__ = ("connection", "request_id")

    def __init__(self, connection: Connection, request_id: Any) -> None:
        self.connection = connection
        self.request_id = request_id

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
