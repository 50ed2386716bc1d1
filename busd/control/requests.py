"""What an op is, what it is given, and what it may answer with.

An op is a function ``handler(ctx, args)`` run on the I/O loop. It returns
its result, or when it must wait a coroutine (answered by a task) or a
:class:`Pending` (answered when resolved, without a task).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from busd.control.access import Peer


class Connection(Protocol):
    """A client connection, as ops and pending answers see it
    (busd.control.connection.Connection is the one)."""

    peer: Peer

    def send(self, message: dict[str, Any]) -> None:
        """Queue ``message`` for the client."""

    def answer_later(self, pending: Pending, request_id: Any, value: Any) -> None:
        """Answer a request whose op returned ``pending``."""

    def open_stream(self, stream_id: Any, cleanup: Callable[[], None]) -> None:
        """Keep a stream open until cancelled or disconnected."""

    def end_stream(self, stream_id: Any) -> bool:
        """End one stream; False when none has that id."""

    def close(self) -> None:
        """End every stream and task, and close the socket."""


class Op(NamedTuple):
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

    def end_stream(self, stream_id: Any) -> bool:
        """End this client's stream ``stream_id``; False when it has none."""
        return self.connection.end_stream(stream_id)
