"""One client of the control socket: its frames in, its answers and stream
events out.

Nothing a client sends can stop the server: a bad frame gets a typed error
(and, when the byte stream can't be trusted any more, the connection is
closed); an op that raises is answered ``internal`` with an id to find the
traceback in the log. A client that never reads its answers is cut off
once its unsent output passes a bound, with a log line.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from busd.control.access import READ, WRITE, AccessPolicy, Peer, peer_of
from busd.control.requests import Op, Pending, RequestContext
from busd.control.shared import ServerState
from busd.protocol import (
    ErrorCode,
    FrameDecoder,
    ProtocolError,
    error_reply,
    ok_reply,
    parse_request,
)

log = logging.getLogger("busd.control")


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

    def __init__(self, shared: ServerState, number: int) -> None:
        self.shared = shared
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
        self._decoder = FrameDecoder(shared.settings.max_frame)
        self.outbox = shared.outbox
        self._frame_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Learn who called; refuse them if busd has max_clients already."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = peer_of(transport.get_extra_info("socket"))
        connections = self.shared.connections
        if len(connections) >= self.shared.settings.max_clients:
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
        self.shared.connections.discard(self)

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
                self.shared.settings.frame_timeout, self._frame_timed_out
            )

    def _frame_timed_out(self) -> None:
        self._frame_timer = None
        self._refuse(
            ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"incomplete frame: no data for "
                f"{self.shared.settings.frame_timeout:g} s; closing the connection",
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
        op = self.shared.ops.get(op_name)
        if op is None:
            known = ", ".join(sorted(self.shared.ops))
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
        policy = self.shared.policy
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
            frame = self.shared.encode(message)
        except ProtocolError as error:
            # Only a bug can get here: ops return msgpack-able results.
            log.error("Cannot encode an answer to %s: %s", self.peer, error.message)
            frame = self.shared.encode(
                error_reply(message.get("id"), ErrorCode.INTERNAL, error.message)
            )
        # Answers leave in one write per read or loop turn (the outbox), not
        # one each: a window of publishes is answered by one write.
        if not self._outgoing:
            self.outbox.add(self, answer=True)
        self._outgoing.append(frame)
        self._outgoing_size += len(frame)
        # What the socket still holds is asked once per write (write_queued).
        if self._outgoing_size + self._unsent > self.shared.settings.max_output:
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


def _safe_id(request_id: Any) -> Any:
    if isinstance(request_id, bool) or not isinstance(request_id, int | str):
        return None
    return request_id
