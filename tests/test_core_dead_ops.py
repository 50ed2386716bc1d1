"""The dead-letter ops in-process (busd/ops/dead.py), over a real Router and
store with routes that keep what they are given.

``dead_replay`` returns a coroutine that lets the loop run between batches;
these tests drive it by hand (``send(None)`` runs it to its next yield), so
they can change the world between two batches.
"""

from __future__ import annotations

from collections.abc import Coroutine
from types import SimpleNamespace
from typing import Any

import pytest

from busd.control.access import Peer
from busd.control.requests import RequestContext
from busd.ops import dead
from busd.protocol import ErrorCode, ProtocolError
from busd.router import Router
from busd.supervision.delivery import Delivery


class Route:
    """A route that keeps what it is given; ``busy`` is its busy_reason."""

    def __init__(self, name: str, *channels: str) -> None:
        self.name = name
        self.channels = channels
        self.busy: str | None = None
        self.accepted: list[Delivery] = []

    def busy_reason(self) -> str | None:
        return self.busy

    def accept(self, delivery: Delivery) -> None:
        self.accepted.append(delivery)

    def restore(self, delivery: Delivery) -> None:
        self.accepted.append(delivery)


def world(letters: dict[str, int]) -> tuple[Any, Router, dict[str, Route]]:
    """Services with a router whose store holds ``letters`` (channel -> how
    many, in that order), and a route per channel."""
    router = Router()
    routes = {channel: Route(f"b-{channel}", channel) for channel in letters}
    for channel, count in letters.items():
        for n in range(count):
            router.dead_letters.add(n, channel, f"{channel} {n}", "gone", 1, ["e"])
    router.set_routes("local", routes.values())
    return SimpleNamespace(router=router), router, routes


CTX = RequestContext(SimpleNamespace(peer=Peer(1, 0, 0, frozenset())), 1)


def drive(replay: Coroutine[Any, Any, Any], between: Any = None) -> tuple[Any, int]:
    """Run ``replay`` to its end; call ``between()`` at each yield. Returns
    the answer and how many times it let the loop run."""
    turns = 0
    while True:
        try:
            replay.send(None)
        except StopIteration as end:
            return end.value, turns
        turns += 1
        if between is not None:
            between()


def test_a_replay_of_many_letters_yields_between_batches_and_lists_a_bounded_answer():
    services, router, routes = world({"main": 2 * dead.MAX_LIST + 50})
    answer, turns = drive(dead.dead_replay(services, CTX, {"all": True}))
    assert turns == (2 * dead.MAX_LIST + 50) // dead.REPLAY_BATCH
    assert answer["replayed_count"] == 2 * dead.MAX_LIST + 50
    assert len(answer["replayed"]) == dead.MAX_LIST
    assert answer["replayed"][0] == {"id": 1, "message_id": 1, "brokers": 1}
    assert (answer["kept"], answer["count"]) == ([], 0)
    assert [d.message for d in routes["main"].accepted][:2] == ["main 0", "main 1"]
    assert len(router.dead_letters) == 0


def test_a_refused_channel_keeps_its_later_letters_even_once_it_has_room():
    services, router, routes = world({"main": 150, "side": 150})
    routes["main"].busy = "main is full"

    def room() -> None:
        routes["main"].busy = None  # too late: order must hold

    answer, _ = drive(dead.dead_replay(services, CTX, {"all": True}), room)
    [kept] = answer["kept"]
    assert kept == {
        "error": "main is full; try again later",
        "code": "busy",
        "ids": list(range(1, 151)),
        "count": 150,
    }
    assert answer["replayed_count"] == 150  # side went on
    assert routes["main"].accepted == []
    assert list(router.dead_letters.letters) == list(range(1, 151))


def test_a_letter_dropped_between_batches_is_skipped():
    services, router, routes = world({"main": 250})

    def drop_the_last() -> None:
        router.dead_letters.remove([250])

    answer, _ = drive(dead.dead_replay(services, CTX, {"all": True}), drop_the_last)
    assert answer["replayed_count"] == 249
    assert len(routes["main"].accepted) == 249


def test_unknown_ids_refuse_the_whole_request_before_anything_is_done():
    services, router, routes = world({"main": 3})
    for op in (dead.dead_replay, dead.dead_drop):
        with pytest.raises(ProtocolError) as info:
            op(services, CTX, {"ids": [1, 9, 12]})
        assert info.value.code == ErrorCode.NOT_FOUND
        assert info.value.message == (
            "no dead letters 9, 12 (the store holds 3 letters; `busctl dead list` "
            "shows them)"
        )
    assert routes["main"].accepted == [] and len(router.dead_letters) == 3


def test_a_page_of_the_list_and_the_next():
    services, _, _ = world({"main": 5})
    first = dead.dead_list(services, CTX, {"limit": 2})
    assert [d["id"] for d in first["letters"]] == [1, 2]
    assert (first["more"], first["count"], first["overflowed"]) == (True, 5, 0)
    last = dead.dead_list(services, CTX, {"after": 4})
    assert ([d["id"] for d in last["letters"]], last["more"]) == ([5], False)


def test_drop_lists_a_bounded_answer_and_counts_it_all():
    services, _, _ = world({"main": dead.MAX_LIST + 1})
    answer = dead.dead_drop(services, CTX, {"all": True})
    assert len(answer["dropped"]) == dead.MAX_LIST
    assert (answer["dropped_count"], answer["count"]) == (dead.MAX_LIST + 1, 0)
