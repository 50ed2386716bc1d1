"""The floor for a round trip: a bare asyncio msgpack server.

It speaks busd's framing (4-byte big-endian length, then one msgpack map)
and answers every request ``{"id": <its id>, "ok": True, "result":
"pong"}``, doing nothing else: no op table, no access check, no tasks. A
client (``busctl.Client`` included) cannot tell it from busd for ``ping``.

Run: ``python bench/echo_server.py SOCKET`` (until SIGTERM or SIGINT).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import struct
import sys

import msgpack

HEADER = struct.Struct(">I")


class EchoProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        out = []
        while len(buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(buffer)
            end = HEADER.size + length
            if len(buffer) < end:
                break
            request = msgpack.unpackb(bytes(buffer[HEADER.size : end]), raw=False)
            del buffer[:end]
            body = msgpack.packb(
                {"id": request.get("id"), "ok": True, "result": "pong"},
                use_bin_type=True,
            )
            out.append(HEADER.pack(len(body)) + body)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


async def serve(path: str) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set_result, None)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = await loop.create_unix_server(EchoProtocol, path)
    async with server:
        await stop
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: echo_server.py SOCKET", file=sys.stderr)
        return 64
    asyncio.run(serve(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
