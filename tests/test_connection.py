"""Connection in-process: what a client hears when an op fails inside busd.

A ``Connection`` is built as the control server builds one (a
``ServerState`` with its settings, policy, op table and outbox) and served
on a real socket pair through asyncio's own transport, so ``connection_made``
reads the peer's credentials from the kernel as it does in busd. The op
table is the test's: ops that raise, and ``ping``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

from busd.control.access import READ, AccessPolicy
from busd.control.connection import Connection
from busd.control.requests import Op, RequestContext
from busd.control.settings import ServerSettings
from busd.control.shared import ServerState
from busd.outbox import Outbox
from busd.protocol import FrameDecoder, encode_frame

DEADLINE = 10.0
CONNECTION_NUMBER = 7


def raises_at_once(ctx: RequestContext, args: dict[str, Any]) -> Any:
    raise RuntimeError("a bug in an op")


async def raises_later(ctx: RequestContext, args: dict[str, Any]) -> Any:
    await asyncio.sleep(0)
    raise KeyError("a bug after a wait")


OPS = {
    "at_once": Op(raises_at_once, READ),
    "later": Op(raises_later, READ),  # answered by a task: the other path
    "ping": Op(lambda ctx, args: "pong", READ),
}


class Collect(logging.Handler):
    """Keeps the records of one logger (busd's own logging may have turned
    propagation to the root logger, and so pytest's caplog, off)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def exchange(requests: list[dict[str, Any]], answers: int) -> list[Any]:
    """Send ``requests`` to a Connection serving OPS; return its first answers."""
    loop = asyncio.get_running_loop()
    state = ServerState(
        ServerSettings(path="unused"), AccessPolicy(), OPS, Outbox(loop)
    )
    server_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    connection = Connection(state, CONNECTION_NUMBER)
    try:
        await loop.connect_accepted_socket(lambda: connection, sock=server_end)
        client_end.setblocking(False)
        await loop.sock_sendall(client_end, b"".join(map(encode_frame, requests)))
        decoder = FrameDecoder()
        replies: list[Any] = []
        while len(replies) < answers:
            data = await asyncio.wait_for(loop.sock_recv(client_end, 65536), DEADLINE)
            assert data, "the connection was closed"
            replies += decoder.feed(data)
        return replies
    finally:
        connection.close()
        client_end.close()


def test_an_op_that_raises_is_answered_internal_with_an_incident_id_in_the_log():
    """An op that raises an unexpected exception (at once, or after a wait)
    is answered ``internal`` with "internal error ID; busd's log has the
    details"; the log has the traceback under that ID; and the connection
    goes on serving.
    """
    handler = Collect()
    logger = logging.getLogger("busd.control")
    logger.addHandler(handler)
    try:
        replies = asyncio.run(
            exchange(
                [
                    {"id": "r1", "op": "at_once"},
                    {"id": 2, "op": "later"},
                    {"id": 3, "op": "ping"},
                ],
                answers=3,
            )
        )
    finally:
        logger.removeHandler(handler)
    by_id = {reply["id"]: reply for reply in replies}
    assert by_id[3] == {"id": 3, "ok": True, "result": "pong"}
    for request_id, exception in (
        ("r1", "RuntimeError: a bug in an op"),
        (2, "KeyError: 'a bug after a wait'"),
    ):
        incident = f"{os.getpid()}-{CONNECTION_NUMBER}-{request_id}"
        assert by_id[request_id] == {
            "id": request_id,
            "ok": False,
            "error": {
                "code": "internal",
                "message": f"internal error {incident}; busd's log has the details",
            },
        }
        (record,) = [r for r in handler.records if incident in r.getMessage()]
        assert record.levelno == logging.ERROR
        assert record.getMessage() == (
            f"Internal error {incident} in a request from "
            f"pid {os.getpid()} uid {os.getuid()}"
        )
        text = logging.Formatter().format(record)  # as busd's log shows it
        assert "Traceback (most recent call last)" in text
        assert text.rstrip().endswith(exception)
