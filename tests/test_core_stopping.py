"""Router in-process: once busd is stopping, no message is accepted.

The daemon calls ``Router.refuse_publishes`` at stop step 1 (busd/daemon.py);
the end-to-end tests are in tests/test_start_stop.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from busd.protocol import ErrorCode, ProtocolError
from busd.router import Router
from busd.spool import Spool
from busd.supervision.delivery import Delivery


class Route:
    """Keeps what it is given."""

    name = "keep"
    channels = ("main",)

    def __init__(self) -> None:
        self.accepted: list[Delivery] = []

    def busy_reason(self) -> str | None:
        return None

    def accept(self, delivery: Delivery) -> None:
        self.accepted.append(delivery)

    def restore(self, delivery: Delivery) -> None:
        self.accepted.append(delivery)


def test_a_stopping_router_refuses_every_message_and_records_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    router, route, heard = Router(), Route(), []
    router.use_spool(Spool(str(tmp_path)))
    router.set_routes("local", [route])
    router.subscribe("main", lambda channel, message: heard.append(message))
    assert router.publish("main", "before")["id"] == 1

    router.refuse_publishes("busd is stopping")
    with pytest.raises(ProtocolError) as refused:
        router.publish("main", "after")
    assert (refused.value.code, refused.value.message) == (
        ErrorCode.BUSY,
        "busd is stopping: the message was not accepted; try again once busd "
        "runs again",
    )
    with caplog.at_level(logging.ERROR, logger="busd"):
        router.publish_from_worker("up:0", "main", "from a worker")
    assert "up:0: its publish on 'main' was refused: busd is stopping" in caplog.text

    assert [d.message for d in route.accepted] == ["before"]
    assert heard == ["before"] and router.published == 1
    router.close_spool()
    spooled = Spool(str(tmp_path))
    assert [e.message for e in spooled.pending.values()] == ["before"]
    spooled.close()
