"""The busd wire format, shared by the daemon, ``busctl`` and broker pipes.

A frame is a 4-byte big-endian length followed by that many bytes holding
one msgpack map. A frame longer than the receiver's maximum is refused as
soon as its header is read, before any of its body is buffered.

Control messages (documented in docs/protocol.md)::

    request   {"id": 7, "op": "publish", "channel": "main", "message": ...}
    success   {"id": 7, "ok": True, "result": ...}
    failure   {"id": 7, "ok": False, "error": {"code": "busy", "message": ...}}
    stream    {"id": 7, "event": ...}        (subscribe, events, logs -f)

This module does no I/O: :class:`FrameDecoder` is fed bytes by whoever owns
the socket (an asyncio protocol in the daemon, a blocking socket in the
client), so both sides share one parser. It imports only the standard
library and msgpack, which keeps ``busctl`` quick to start.
"""

from __future__ import annotations

import enum
import struct

import msgpack

# typing costs busctl's start-up about 3 ms; annotations don't need it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeGuard

__all__ = [
    "DEFAULT_MAX_FRAME",
    "PROTOCOL_VERSION",
    "ErrorCode",
    "FrameDecoder",
    "FrameEncoder",
    "ProtocolError",
    "encode_frame",
    "error_reply",
    "ok_reply",
    "parse_request",
]

#: Bumped when a change would break an existing client (see docs/protocol.md).
PROTOCOL_VERSION = 1

#: The largest frame accepted unless configured otherwise (1 MiB).
DEFAULT_MAX_FRAME = 1 << 20

HEADER = struct.Struct(">I")

# Request ids are plain integers or short strings chosen by the client.
MAX_ID_LENGTH = 64
MAX_OP_LENGTH = 64


class ErrorCode(enum.StrEnum):
    """The fixed vocabulary of error codes a client can branch on."""

    BAD_REQUEST = "bad_request"  # not a frame, not a map, wrong field types
    UNKNOWN_OP = "unknown_op"
    TOO_LARGE = "too_large"  # frame over the maximum; the connection closes
    PERMISSION_DENIED = "permission_denied"
    UNKNOWN_CHANNEL = "unknown_channel"
    BUSY = "busy"  # a queue is full: try again later
    # publish --wait: a broker on the channel has no instance that can run
    # (all FATAL or stopped): nothing will take the message until an operator acts
    UNAVAILABLE = "unavailable"
    NOT_FOUND = "not_found"  # no such broker or instance
    BAD_CONFIG = "bad_config"  # reload refused: busd's config file is broken
    INTERNAL = "internal"  # a bug in busd: the log has the details


class ProtocolError(Exception):
    """A message that breaks the protocol, with the code to answer it with.

    ``fatal`` means the byte stream can no longer be trusted (bad header,
    undecodable body) and the connection must be closed after replying.
    """

    def __init__(self, code: ErrorCode, message: str, *, fatal: bool = False):
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal


def encode_frame(message: Any, max_frame: int | None = None) -> bytes:
    """Return ``message`` packed with msgpack behind its length header.

    Raises :class:`ProtocolError`: ``too_large`` when the packed body is
    over ``max_frame`` (the sender learns it before the receiver refuses),
    ``bad_request`` when a value has no msgpack form (an int over 64 bits,
    an arbitrary object).
    """
    return _frame(msgpack.packb, message, max_frame)


class FrameEncoder:
    """``encode_frame`` with a msgpack Packer of its own, built once.

    Twice as quick as ``encode_frame`` for small frames (which builds a
    Packer per call), for the hot paths; a Packer is not thread-safe, so
    each encoder belongs to one thread (busd's I/O loop, say).
    """

    def __init__(self, max_frame: int | None = None) -> None:
        self.max_frame = max_frame
        self._pack: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack

    def __call__(self, message: Any) -> bytes:
        """One frame holding ``message``; raises as ``encode_frame``."""
        return _frame(self._pack, message, self.max_frame)


def _frame(pack: Callable[[Any], bytes], message: Any, max_frame: int | None) -> bytes:
    try:
        body = pack(message)
    except (TypeError, ValueError, OverflowError) as error:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"message cannot be encoded as msgpack ({error})"
        ) from None
    if max_frame is not None and len(body) > max_frame:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"frame of {len(body)} bytes is over the maximum of {max_frame} bytes",
        )
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes | bytearray) -> dict[str, Any]:
    """Unpack one frame body, which must be a msgpack map with string keys."""
    try:
        message = msgpack.unpackb(body, raw=False)
    except UnicodeDecodeError:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "frame holds a string that is not valid UTF-8"
        ) from None
    except msgpack.ExtraData:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            "frame holds more than one msgpack value",
        ) from None
    except msgpack.StackError:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "frame is nested too deeply"
        ) from None
    except (ValueError, msgpack.UnpackException) as error:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"frame is not valid msgpack ({error})"
        ) from None
    if not isinstance(message, dict):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"frame must hold a msgpack map, got {type(message).__name__}",
        )
    return message


class FrameDecoder:
    """Turn a byte stream into decoded frames, one ``feed()`` at a time.

    ``feed(data)`` returns the messages completed by ``data``. A header
    announcing more than ``max_frame`` bytes raises a fatal
    :class:`ProtocolError` at once: the body is never buffered.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        # Bytes of frames not yet complete, their headers included.
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole frame.

        A header counts too: a client that sent only a header is in the
        middle of a frame (the frame timeout must apply to it).
        """
        return len(self._buffer)

    def feed(self, data: bytes) -> list[dict[str, Any] | ProtocolError]:
        """Add ``data``; return each completed message in order.

        A frame whose body is not a valid map comes back as a (non-fatal)
        :class:`ProtocolError` in the list, in its place, so that the
        caller can answer it and go on with the next frame. Fatal errors
        (oversized frame) are raised.
        """
        buffer = self._buffer
        buffer += data
        messages: list[dict[str, Any] | ProtocolError] = []
        # Walk the frames with an offset and trim the buffer once at the
        # end: cutting each frame off the front would copy what follows.
        start, end = 0, len(buffer)
        try:
            while end - start >= HEADER.size:
                (length,) = HEADER.unpack_from(buffer, start)
                if length > self.max_frame:
                    raise ProtocolError(
                        ErrorCode.TOO_LARGE,
                        f"frame of {length} bytes is over the maximum of "
                        f"{self.max_frame} bytes",
                        fatal=True,
                    )
                body_start = start + HEADER.size
                if end - body_start < length:
                    break  # the rest of this frame is still to come
                start = body_start + length
                try:
                    messages.append(decode_body(buffer[body_start:start]))
                except ProtocolError as error:
                    if error.fatal:
                        raise
                    messages.append(error)
            return messages
        finally:
            del buffer[:start]


def parse_request(message: dict[str, Any]) -> tuple[int | str, str, dict[str, Any]]:
    """Check the envelope of a request; return ``(id, op, arguments)``.

    The arguments are the other keys of the map; each op checks its own.
    Raises :class:`ProtocolError` (``bad_request``) naming the faulty field.
    """
    request_id = message.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, int | str):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"request 'id' must be an integer or a string, got {_type(request_id)}",
        )
    if isinstance(request_id, str) and len(request_id) > MAX_ID_LENGTH:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"request 'id' is longer than {MAX_ID_LENGTH} characters",
        )
    op = message.get("op")
    if not isinstance(op, str) or not op or len(op) > MAX_OP_LENGTH:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"request 'op' must be a non-empty string, got {_type(op)}",
        )
    arguments = message.copy()
    del arguments["id"], arguments["op"]
    return request_id, op, arguments


def ok_reply(request_id: int | str | None, result: Any = None) -> dict[str, Any]:
    """The answer to a request that succeeded."""
    return {"id": request_id, "ok": True, "result": result}


def error_reply(
    request_id: int | str | None, code: ErrorCode, message: str
) -> dict[str, Any]:
    """The answer to a request that failed."""
    return {
        "id": request_id,
        "ok": False,
        "error": {"code": str(code), "message": message},
    }


def _type(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


# -- channel names ---------------------------------------------------------------

#: The one rule for a channel name, in the config, in every op and in a
#: worker's publish (docs/protocol.md).
CHANNEL_NAME_RULE = "1 to 64 letters, digits, '-', '_' or '.'"
MAX_CHANNEL_LENGTH = 64
_CHANNEL_CHARACTERS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_."
)
#: Where a message that failed too often is published.
DEAD_CHANNEL = "dead"


def is_channel_name(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a valid channel name (``CHANNEL_NAME_RULE``)."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_CHANNEL_LENGTH
        and _CHANNEL_CHARACTERS.issuperset(value)
    )


#: The environment variable that carries a ``command`` broker's own
#: PYTHONPATH through the worker wrapper, which restores it before exec.
ORIGINAL_PYTHONPATH = "BUSD_ORIGINAL_PYTHONPATH"
