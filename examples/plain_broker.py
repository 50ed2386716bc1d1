"""A busd broker written without busd: msgpack and the standard library only.

This is the reference implementation of docs/broker-protocol.md, meant to
be copied into any language. Configure it as::

    [brokers.plain]
    command = ["python3", "/path/to/examples/plain_broker.py"]
    channels = ["main"]

It answers "ready", logs ``got MESSAGE on CHANNEL`` for every delivery and
acks it; a message that is not a string is nacked with an error text (busd
retries it, then sends it to the ``dead`` channel). It exits 0 when busd
sends "stop" or closes stdin.
"""

import os
import signal
import struct
import sys
from collections.abc import Iterator

import msgpack

HEADER = struct.Struct(">I")  # every frame: 4-byte big-endian body length


def send(frame: dict) -> None:
    """Write one frame to busd. stdout carries frames and nothing else."""
    body = msgpack.packb(frame, use_bin_type=True)
    sys.stdout.buffer.write(HEADER.pack(len(body)) + body)
    sys.stdout.buffer.flush()


def log(line: str) -> None:
    """One log line for busd; a prefix "ERROR: " or "WARNING: " sets its level."""
    print(line, file=sys.stderr, flush=True)


def read_exactly(size: int) -> bytes | None:
    """``size`` bytes from busd, or None at end of input."""
    data = b""
    while len(data) < size:
        chunk = sys.stdin.buffer.read(size - len(data))
        if not chunk:
            return None  # stdin closed: busd is done with us (or gone)
        data += chunk
    return data


def frames() -> Iterator[dict]:
    """Yield each frame busd sends, until stdin ends."""
    while (header := read_exactly(HEADER.size)) is not None:
        body = read_exactly(HEADER.unpack(header)[0])
        if body is None:
            return
        yield msgpack.unpackb(body, raw=False)


def main() -> int:
    # SIGTERM is busd insisting (stop_timeout / 2 after "stop"): leave now.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    send({"type": "ready", "pid": os.getpid()})
    for frame in frames():
        kind = frame.get("type")
        if kind == "stop":
            break
        if kind != "deliver":
            log(f"WARNING: ignoring a frame of type {kind!r}")
            continue  # newer busd, newer frame types: skip what we don't know
        message, channel = frame["message"], frame["channel"]
        if isinstance(message, str):
            log(f"got {message} on {channel}")
            send({"type": "ack", "id": frame["id"]})
        else:
            error = f"TypeError: expected a string, got {type(message).__name__}"
            log(f"ERROR: attempt {frame['attempt']}: {error}")
            send({"type": "nack", "id": frame["id"], "error": error})
    return 0


if __name__ == "__main__":
    sys.exit(main())
