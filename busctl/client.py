"""``busctl.Client``: a small synchronous client for the busd control socket.

::

    from busctl import Client

    with Client("/run/busd/busd.sock") as busd:
        print(busd.state()["state"])
        busd.publish("main", "BUY ABCD 10")
        for event in busd.subscribe("main"):
            print(event["channel"], event["message"])

Every call sends one request frame and reads frames until its answer
comes; stream events that arrive meanwhile are kept for the stream they
belong to. ``publish_many`` keeps a window of requests in flight, which is
how ``busctl publish CHANNEL -`` sends many messages quickly.
"""

from __future__ import annotations

import collections
import itertools
import os
import socket
import time

from busd.protocol import (
    DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
    FrameDecoder,
    FrameEncoder,
    ProtocolError,
)

# typing costs busctl's start-up about 3 ms; annotations don't need it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from typing import Any, Literal, overload

__all__ = [
    "DEFAULT_SOCKET",
    "BusError",
    "Client",
    "ClientError",
    "DaemonUnavailable",
    "Timeout",
]

DEFAULT_SOCKET = "/run/busd/busd.sock"
DEFAULT_TIMEOUT = 10.0
READ_CHUNK = 256 * 1024


class ClientError(Exception):
    """Base class of everything this client raises."""


class DaemonUnavailable(ClientError):
    """No busd answers at the socket path (not running, or wrong path)."""


class Timeout(ClientError):
    """busd did not answer in time."""


class BusError(ClientError):
    """busd answered with an error; ``code`` is one of docs/protocol.md's."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


def default_socket() -> str:
    """``$BUSD_SOCKET`` if set, else the packaged default path."""
    return os.environ.get("BUSD_SOCKET") or DEFAULT_SOCKET


class Client:
    """A connection to busd. Use as a context manager, or call ``close()``.

    ``timeout`` bounds each wait for an answer (None waits forever), not
    the life of a stream.
    """

    def __init__(
        self,
        path: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.path = path or default_socket()
        self.timeout = timeout
        self.max_frame = max_frame
        self._decoder = FrameDecoder(max_frame)
        self._encoder = FrameEncoder(max_frame)
        self._ids = itertools.count(1)
        self._answers: dict[Any, dict[str, Any]] = {}
        self._events: dict[Any, collections.deque[Any]] = {}
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except FileNotFoundError:
            self._sock.close()
            raise DaemonUnavailable(
                f"busd is not running: no socket at {self.path}"
            ) from None
        except ConnectionRefusedError:
            self._sock.close()
            raise DaemonUnavailable(
                f"busd is not running: {self.path} refuses connections"
            ) from None
        except BlockingIOError:
            # A Unix socket's connect fails with EAGAIN (it does not wait,
            # whatever the timeout) when busd's accept queue is full.
            self._sock.close()
            raise BusError(
                "busy", f"busd's connection queue on {self.path} is full"
            ) from None
        except PermissionError:
            self._sock.close()
            raise BusError(
                "permission_denied",
                f"no permission to connect to {self.path}: ask for its group",
            ) from None
        except TimeoutError:
            self._sock.close()
            raise Timeout(f"busd did not accept a connection on {self.path}") from None
        except OSError as error:
            self._sock.close()
            raise DaemonUnavailable(f"cannot connect to {self.path}: {error}") from None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (ends every stream)."""
        self._sock.close()

    # -- requests ------------------------------------------------------------

    def send(self, op: str, **arguments: Any) -> int:
        """Send a request without waiting; return its id for ``wait()``.

        A request busd would refuse for its size (``too_large``, over
        ``max_frame``) or that has no msgpack form (``bad_request``) raises
        :class:`BusError` here, before anything is sent: busd would close
        the connection on an oversized frame, mid-write.
        """
        request_id = next(self._ids)
        self._write(self._encode({"id": request_id, "op": op, **arguments}))
        return request_id

    def _encode(self, request: dict[str, Any]) -> bytes:
        try:
            return self._encoder(request)
        except ProtocolError as error:
            raise BusError(str(error.code), error.message) from None

    def wait(self, request_id: int) -> Any:
        """Read until the answer to ``request_id`` arrives; return its result.

        Raises :class:`BusError` when busd answered with an error.
        """
        while request_id not in self._answers:
            self._read_frames()
        return _result(self._answers.pop(request_id))

    def call(self, op: str, **arguments: Any) -> Any:
        """Run one op and return its result."""
        return self.wait(self.send(op, **arguments))

    def _call_for_map(self, op: str, **arguments: Any) -> dict[str, Any]:
        """``call`` for the ops whose result docs/protocol.md says is a map.

        Only the annotation narrows: busd's answer is not checked.
        """
        result: dict[str, Any] = self.call(op, **arguments)
        return result

    def ping(self) -> str:
        """``"pong"`` when busd is alive."""
        pong: str = self.call("ping")
        return pong

    def hello(self) -> dict[str, Any]:
        """Agree on the protocol version; busd's version, PID and ops."""
        return self._call_for_map("hello", versions=[PROTOCOL_VERSION], client="busctl")

    def state(self) -> dict[str, Any]:
        """The bus state, process figures and counters."""
        return self._call_for_map("state")

    def publish(self, channel: str, message: Any, wait: bool = False) -> dict[str, Any]:
        """Publish ``message`` (any msgpack value) on ``channel``.

        With ``wait``, busd answers once every broker on the channel has
        acknowledged the message or given up on it, and the result also
        counts them: ``acked`` and ``dead``.
        """
        if wait:
            return self._call_for_map(
                "publish", channel=channel, message=message, wait=True
            )
        return self._call_for_map("publish", channel=channel, message=message)

    def publish_many(
        self,
        channel: str,
        messages: Iterable[Any],
        window: int = 64,
        wait: bool = False,
    ) -> list[dict[str, Any]]:
        """Publish each message, keeping up to ``window`` requests in flight.

        Results come back in the order of ``messages``. The first error
        raises :class:`BusError` once the messages before it are answered.
        ``wait`` is :meth:`publish`'s, for each message.
        """
        extra = {"wait": True} if wait else {}
        pending: collections.deque[int] = collections.deque()
        results: list[dict[str, Any]] = []
        answers = self._answers
        # Requests go out in one write per batch, not one each: whenever
        # the window is full, the batch is sent, the oldest answer awaited,
        # and every answer already read makes room for the next batch.
        batch: list[bytes] = []
        for message in messages:
            if len(pending) >= window:
                self._write(b"".join(batch))
                batch.clear()
                results.append(self.wait(pending.popleft()))
                while pending and pending[0] in answers:
                    results.append(_result(answers.pop(pending.popleft())))
            request_id = next(self._ids)
            batch.append(
                self._encode(
                    {
                        "id": request_id,
                        "op": "publish",
                        "channel": channel,
                        "message": message,
                        **extra,
                    }
                )
            )
            pending.append(request_id)
        if batch:
            self._write(b"".join(batch))
        while pending:
            results.append(self.wait(pending.popleft()))
        return results

    def broker_start(self, broker: str, instance: int | None = None) -> dict[str, Any]:
        """Start one instance of ``broker``, or every one that is not running.

        Returns the broker's description (a ``state`` row) once the
        instances are RUNNING or have failed (BACKOFF: busd tries again; FATAL).
        """
        return self._broker_op("broker_start", broker, instance)

    def broker_stop(self, broker: str, instance: int | None = None) -> dict[str, Any]:
        """Stop one instance of ``broker``, or all; the broker's description."""
        return self._broker_op("broker_stop", broker, instance)

    def broker_restart(
        self, broker: str, instance: int | None = None
    ) -> dict[str, Any]:
        """Restart one instance, or all one after the other; the description."""
        return self._broker_op("broker_restart", broker, instance)

    def scale(self, broker: str, instances: int) -> dict[str, Any]:
        """Run ``instances`` instances of ``broker``; the broker's description."""
        return self._call_for_map("scale", broker=broker, instances=instances)

    def _broker_op(self, op: str, broker: str, instance: int | None) -> dict[str, Any]:
        if instance is None:
            return self._call_for_map(op, broker=broker)
        return self._call_for_map(op, broker=broker, instance=instance)

    def dead_list(self, after: int = 0, limit: int | None = None) -> dict[str, Any]:
        """One page of dead letters in short, oldest first, ids over ``after``.

        ``{"letters": [...], "more", "count", "overflowed"}``; ``more`` says
        a next page (``after`` the last id) has more. :meth:`dead_letters`
        reads every page.
        """
        if limit is None:
            return self._call_for_map("dead_list", after=after)
        return self._call_for_map("dead_list", after=after, limit=limit)

    def dead_letters(self) -> list[dict[str, Any]]:
        """Every dead letter in short (``id``, ``message_id``, ``channel``,
        ``broker``, ``attempts``, ``when``, ``error``, ``preview``)."""
        letters: list[dict[str, Any]] = []
        page = self.dead_list()
        letters += page["letters"]
        while page["more"] and page["letters"]:
            page = self.dead_list(after=page["letters"][-1]["id"])
            letters += page["letters"]
        return letters

    def dead_show(self, letter_id: int) -> dict[str, Any]:
        """Dead letter ``letter_id`` whole: its message and errors.

        :class:`BusError` ``not_found`` when the store has no such letter.
        """
        return self._call_for_map("dead_show", letter=letter_id)

    def dead_replay(self, *letter_ids: int, every: bool = False) -> dict[str, Any]:
        """Publish these dead letters' messages again (``every``: all of them).

        Each goes to its channel as a new message. The answer lists the
        ``replayed`` ones (``id``, ``message_id``, ``brokers``) and those
        ``kept`` in the store, by reason (``error``, ``code``, ``ids``):
        a busy broker, a channel no broker listens on any more.
        """
        if every:
            return self._call_for_map("dead_replay", all=True)
        return self._call_for_map("dead_replay", ids=list(letter_ids))

    def dead_drop(self, *letter_ids: int, every: bool = False) -> dict[str, Any]:
        """Remove these dead letters for good (``every``: all of them)."""
        if every:
            return self._call_for_map("dead_drop", all=True)
        return self._call_for_map("dead_drop", ids=list(letter_ids))

    def reload(self) -> dict[str, Any]:
        """Ask busd to reload its configuration (like SIGHUP)."""
        return self._call_for_map("reload")

    def shutdown(self, wait: bool = False) -> dict[str, Any]:
        """Ask busd to exit; the answer has its ``pid``.

        With ``wait``, return once busd's process is gone, with
        ``"exited": True`` in the result; raise :class:`Timeout` if it
        still runs ``timeout`` seconds (the client's) after the request.
        """
        if not wait:
            return self._call_for_map("shutdown")
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        pid = self.hello()["pid"]
        # Watched from before the request, so that a PID reused after busd
        # exits cannot be mistaken for busd.
        with _ProcessWatch(pid) as process:
            result = self._call_for_map("shutdown")
            # busd closes its clients late in its stop (docs/architecture.md);
            # that works across PID namespaces, where the PID may mean nothing.
            if not self._wait_closed(deadline) or not process.wait(_left(deadline)):
                raise Timeout(
                    f"busd (PID {pid}) still runs {self.timeout:g} s after the "
                    "shutdown request"
                )
        return {**result, "exited": True}

    def _wait_closed(self, deadline: float | None) -> bool:
        """Read until busd closes the connection; False if not by ``deadline``."""
        old_timeout = self._sock.gettimeout()
        try:
            left = _left(deadline)
            while left != 0:
                self._sock.settimeout(left)
                try:
                    self._read_frames()
                except DaemonUnavailable:
                    return True
                except Timeout:
                    return False
                left = _left(deadline)
            return False
        finally:
            self._sock.settimeout(old_timeout)

    # -- streams -------------------------------------------------------------

    def stream(self, op: str, **arguments: Any) -> Stream:
        """Start a stream op; iterate the returned :class:`Stream` for events."""
        request_id = self.send(op, **arguments)
        self._events[request_id] = collections.deque()
        try:
            result = self.wait(request_id)
        except ClientError:
            self._events.pop(request_id, None)
            raise
        return Stream(self, request_id, result)

    def subscribe(self, *channels: str) -> Stream:
        """Messages published on ``channels``: events ``{channel, message}``."""
        return self.stream("subscribe", channels=list(channels))

    def events(self) -> Stream:
        """Bus (and broker) state changes as they happen."""
        return self.stream("events")

    if TYPE_CHECKING:

        @overload
        def logs(
            self,
            lines: int = 50,
            follow: Literal[False] = False,
            source: str | None = None,
        ) -> dict[str, Any]: ...

        @overload
        def logs(
            self, lines: int = 50, *, follow: Literal[True], source: str | None = None
        ) -> Stream: ...

        @overload
        def logs(
            self, lines: int = 50, follow: bool = False, source: str | None = None
        ) -> dict[str, Any] | Stream: ...

    def logs(
        self, lines: int = 50, follow: bool = False, source: str | None = None
    ) -> dict[str, Any] | Stream:
        """Recent log lines; with ``follow``, a stream of the new ones too."""
        arguments: dict[str, Any] = {"lines": lines, "follow": follow}
        if source is not None:
            arguments["source"] = source
        if not follow:
            return self._call_for_map("logs", **arguments)
        return self.stream("logs", **arguments)

    def _next_event(self, request_id: int, timeout: float | None) -> Any:
        queue = self._events[request_id]
        old_timeout = self._sock.gettimeout()
        self._sock.settimeout(timeout)
        try:
            while not queue:
                self._read_frames()
        except Timeout:
            raise Timeout(
                f"no event on stream {request_id} within {timeout:g} s"
            ) from None
        finally:
            self._sock.settimeout(old_timeout)
        return queue.popleft()

    # -- the socket ------------------------------------------------------------

    def _write(self, frame: bytes) -> None:
        try:
            self._sock.sendall(frame)
        except TimeoutError:
            raise Timeout("busd is not reading requests (send timed out)") from None
        except OSError as error:
            # busd may have refused the connection (too many clients) and
            # closed it before our request went out: its reason is still
            # waiting in the socket, and says more than "broken pipe".
            self._raise_refusal()
            raise DaemonUnavailable(f"lost the connection to busd: {error}") from None

    def _raise_refusal(self) -> None:
        """Raise busd's refusal if one was sent on this socket; else return."""
        try:
            self._sock.settimeout(0.5)
            self._read_frames()
        except BusError:
            raise
        except (ClientError, OSError):
            return  # nothing readable: the caller reports the lost connection

    def _read_frames(self) -> None:
        try:
            data = self._sock.recv(READ_CHUNK)
        except TimeoutError:
            waited = self._sock.gettimeout()
            raise Timeout(f"busd did not answer within {waited:g} s") from None
        except OSError as error:
            raise DaemonUnavailable(f"lost the connection to busd: {error}") from None
        if not data:
            raise DaemonUnavailable("busd closed the connection")
        try:
            messages = self._decoder.feed(data)
        except ProtocolError as error:
            raise ClientError(f"busd sent a broken frame: {error.message}") from None
        for message in messages:
            if isinstance(message, ProtocolError):
                raise ClientError(f"busd sent a broken frame: {message.message}")
            request_id = message.get("id")
            if "event" in message:
                if request_id in self._events:
                    self._events[request_id].append(message["event"])
            elif request_id is None and message.get("ok") is False:
                # An answer to no request: busd refused the connection itself
                # (a frame it could not read, too many clients).
                raise _error(message)
            else:
                self._answers[request_id] = message


class Stream:
    """The events of one stream op; iterate it, or ``next_event(timeout)``."""

    def __init__(self, client: Client, request_id: int, result: Any) -> None:
        self.client = client
        self.id = request_id
        self.result = result

    def __iter__(self) -> Iterator[Any]:
        while True:
            yield self.next_event(timeout=None)

    def next_event(self, timeout: float | None = None) -> Any:
        """The next event; :class:`Timeout` if none comes within ``timeout``."""
        return self.client._next_event(self.id, timeout)

    def cancel(self) -> None:
        """Ask busd to end this stream (the connection stays open)."""
        self.client.call("cancel", stream=self.id)
        self.client._events.pop(self.id, None)


class _ProcessWatch:
    """Waits for a process to end: on a pidfd, else by polling its PID."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd: int | None = None
        self._gone = False
        try:
            self._fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._gone = True
        except (AttributeError, OSError):
            pass  # no pidfd (not Linux 5.3+): poll the PID instead

    def __enter__(self) -> _ProcessWatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def wait(self, timeout: float | None) -> bool:
        """True once the process has ended; False if it runs after ``timeout``."""
        if self._gone:
            return True
        if self._fd is not None:
            import select

            # A pidfd becomes readable when its process exits (a zombie too).
            return bool(select.select([self._fd], [], [], timeout)[0])
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass  # it exists, as another user
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.05)  # no pidfd: nothing to wait on but the clock


def _left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (at least 0), or None for no deadline."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _result(answer: dict[str, Any]) -> Any:
    if answer.get("ok"):
        return answer.get("result")
    raise _error(answer)


def _error(answer: dict[str, Any]) -> BusError:
    error = answer.get("error") or {}
    return BusError(str(error.get("code", "internal")), str(error.get("message", "")))
