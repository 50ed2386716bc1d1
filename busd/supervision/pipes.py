"""A worker's stdout and stderr as busd reads them.

``WorkerStdout`` hands each read of a worker's stdout, cut into frames,
straight to a callback; ``read_log_line`` reads its stderr line by line
with a bound on a line's length; ``describe_status`` words an exit status.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

from busd.protocol import FrameDecoder, ProtocolError

#: The longest stderr line kept whole; a longer one is cut and marked.
MAX_LOG_LINE = 8192
#: The largest frame a worker may send busd.
WORKER_MAX_FRAME = 64 << 20

FramesReceived = Callable[[list[dict[str, Any] | ProtocolError]], None]


class WorkerStdout(asyncio.Protocol):
    """A worker's stdout: each read's frames go straight to ``received``.

    (A StreamReader would hand each read on one loop turn later: on the
    path of every ack.) When the stream stops being a frame stream,
    ``broken`` is called once and the rest is read and dropped.
    """

    def __init__(
        self, received: FramesReceived, broken: Callable[[ProtocolError], None]
    ) -> None:
        self.received = received
        self.broken_callback = broken
        self.decoder = FrameDecoder(WORKER_MAX_FRAME)
        self.broken = False
        #: Done when the worker's end of the pipe is closed (it exited).
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        """Decode and hand over the frames ``data`` completes."""
        if self.broken:
            return  # read on and drop: the worker is being killed
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as error:
            self.broken = True
            self.broken_callback(error)
            return
        self.received(frames)

    def eof_received(self) -> None:
        """The worker closed stdout; connection_lost follows."""

    def connection_lost(self, exc: Exception | None) -> None:
        """The pipe is closed: the worker exited (or closed its stdout)."""
        if not self.closed.done():
            self.closed.set_result(None)


async def read_log_line(stream: asyncio.StreamReader) -> bytes:
    """The next line of ``stream`` (b"" at its end), cut to ``MAX_LOG_LINE``.

    A longer line keeps its start, marked ``[line truncated]``; the rest of
    it is read and dropped. (``readline()`` would drop the start instead, and
    the rest would come out as pieces of the line's middle.)
    """
    try:
        return await stream.readuntil(b"\n")
    except asyncio.IncompleteReadError as error:
        return error.partial  # the last line had no newline
    except asyncio.LimitOverrunError:
        pass  # the buffer holds more than MAX_LOG_LINE bytes of this line
    head = await stream.read(MAX_LOG_LINE)
    while True:
        try:
            await stream.readuntil(b"\n")
            break
        except asyncio.IncompleteReadError:
            break
        except asyncio.LimitOverrunError as error:
            await stream.read(error.consumed)  # no newline in them
    return head + b" [line truncated]"


def describe_status(status: int) -> str:
    """``exit status 3`` or ``killed by SIGKILL`` from a returncode."""
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"
