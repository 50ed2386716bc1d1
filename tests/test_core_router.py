"""Router in-process: numbering, routes, busy, settlements, dead letters, spool.

The first tests use a fake route; the later ones wire real brokers to the
router through ``PoolServices`` (settle=router.settle,
publish=router.publish_from_worker), as the supervisor does, over fake
worker processes (tests/core_fakes.py).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
from core_fakes import Harness, broker_config, run, wait_until

from busd.deadletters import DeadLetter, DeadLetters
from busd.protocol import DEAD_CHANNEL, ErrorCode, ProtocolError
from busd.router import Router
from busd.spool import Spool, SpoolError
from busd.supervision.broker import Broker
from busd.supervision.delivery import Delivery
from busd.supervision.states import InstanceState

S = InstanceState


class FakeRoute:
    """A route that keeps what it is given; ``busy`` is its busy_reason,
    ``down`` its down_reason."""

    def __init__(
        self,
        name: str,
        *channels: str,
        busy: str | None = None,
        down: str | None = None,
    ) -> None:
        self.name = name
        self.channels = channels
        self.busy = busy
        self.down = down
        self.accepted: list[Delivery] = []
        self.restored: list[Delivery] = []

    def busy_reason(self) -> str | None:
        return self.busy

    def down_reason(self) -> str | None:
        return self.down

    def accept(self, delivery: Delivery) -> None:
        self.accepted.append(delivery)

    def restore(self, delivery: Delivery) -> None:
        self.restored.append(delivery)


def ids(deliveries: list[Delivery]) -> list[int]:
    return [d.id for d in deliveries]


# -- publish ------------------------------------------------------------------------


def test_publish_numbers_messages_and_gives_each_route_its_own_delivery() -> None:
    router = Router()
    a, b, c = FakeRoute("a", "main"), FakeRoute("b", "main", "x"), FakeRoute("c", "x")
    router.set_routes("local", [a, b, c])
    assert router.publish("main", {"k": 1}) == {
        "id": 1,
        "brokers": 2,
        "subscribers": 0,
    }
    assert router.publish("x", "two")["id"] == 2
    assert (ids(a.accepted), ids(b.accepted), ids(c.accepted)) == ([1], [1, 2], [2])
    first_a, first_b = a.accepted[0], b.accepted[0]
    assert first_a is not first_b  # attempts and errors are per route
    assert (first_a.channel, first_a.message, first_a.redelivered) == (
        "main",
        {"k": 1},
        False,
    )
    assert (router.published, router.unrouted) == (2, 0)


def test_a_full_route_refuses_the_message_for_every_route_of_its_channel() -> None:
    router = Router()
    free, full = FakeRoute("free", "main"), FakeRoute("full", "main", busy="full!")
    router.set_routes("local", [free, full])
    for _ in range(2):
        with pytest.raises(ProtocolError) as refusal:
            router.publish("main", "m")
        assert refusal.value.code == ErrorCode.BUSY
        assert refusal.value.message == "full!; try again later"
    assert free.accepted == [] and full.accepted == []
    assert router.published == 0
    full.busy = None
    assert router.publish("main", "m")["id"] == 1  # refusals took no id
    assert router.publish("main", "n")["id"] == 2
    assert ids(free.accepted) == ids(full.accepted) == [1, 2]


def test_a_wait_to_a_route_that_is_down_is_refused_and_not_accepted_anywhere(
    tmp_path: Path,
) -> None:
    router = Router()
    router.use_spool(Spool(str(tmp_path)))
    up, down = FakeRoute("up", "main"), FakeRoute("down", "main", down="it is down")
    # Down and full: being down is what counts (waiting would not help).
    down.busy = "full"
    router.set_routes("local", [up, down])
    called: list[Any] = []
    with pytest.raises(ProtocolError) as refusal:
        router.publish("main", "m", called.append)
    assert refusal.value.code == ErrorCode.UNAVAILABLE
    assert refusal.value.message == "it is down; the message was not accepted"
    assert (up.accepted, down.accepted, router.published) == ([], [], 0)
    # A plain publish asks for no answer from the route: it is queued there
    # (and spooled), to be handled once an operator starts the broker.
    down.busy = None
    assert router.publish("main", "plain")["id"] == 1  # the refusal took no id
    assert ids(up.accepted) == ids(down.accepted) == [1]
    down.down = None
    assert router.publish("main", "n", called.append)["id"] == 2
    router.close_spool()
    again = Spool(str(tmp_path))
    try:
        assert sorted(again.pending) == [1, 2]  # nothing of the refused one
    finally:
        again.close()


def test_a_channel_without_routes_is_unrouted_or_with_strict_channels_refused():
    lax, strict = Router(), Router(strict_channels=True)
    for router in (lax, strict):
        router.set_routes("local", [FakeRoute("a", "main")])
    called: list[Any] = []
    assert lax.publish("nowhere", "m", called.append) == {
        "id": 1,
        "brokers": 0,
        "subscribers": 0,
    }
    assert (lax.published, lax.unrouted) == (1, 1)
    assert called == []  # the caller answers at once
    lax.publish("nowhere", "again")
    lax.publish("main", "routed")
    assert (lax.published, lax.unrouted) == (3, 2)
    with pytest.raises(ProtocolError) as refusal:
        strict.publish("nowhere", "m")
    assert refusal.value.code == ErrorCode.UNKNOWN_CHANNEL
    assert "nowhere" in refusal.value.message
    assert strict.publish("main", "m")["id"] == 1


def test_subscribers_hear_the_channels_messages_until_they_unsubscribe() -> None:
    router = Router()
    heard: list[tuple[str, Any]] = []

    def listen(channel: str, message: Any) -> None:
        heard.append((channel, message))

    router.subscribe("news", listen)
    assert router.publish("news", "hi")["subscribers"] == 1
    router.publish("other", "not this")
    router.unsubscribe("news", listen)
    router.unsubscribe("news", listen)  # twice is harmless
    assert router.publish("news", "gone")["subscribers"] == 0
    assert heard == [("news", "hi")]


def test_one_subscriber_leaving_does_not_silence_the_others() -> None:
    router = Router()
    heard: list[tuple[str, Any]] = []

    def first(channel: str, message: Any) -> None:
        heard.append(("first", message))

    def second(channel: str, message: Any) -> None:
        heard.append(("second", message))

    router.subscribe("news", first)
    router.subscribe("news", second)
    assert router.publish("news", 1)["subscribers"] == 2
    router.unsubscribe("news", first)
    assert router.publish("news", 2)["subscribers"] == 1
    router.unsubscribe("news", second)
    assert router.publish("news", 3)["subscribers"] == 0
    assert heard == [("first", 1), ("second", 1), ("second", 2)]


def test_set_routes_merges_sources_and_replaces_one_source_at_a_time() -> None:
    router = Router()
    local, remote = FakeRoute("local-a", "main"), FakeRoute("remote-a", "main")
    router.set_routes("local", [local])
    router.set_routes("remote", [remote])
    assert router.publish("main", 1)["brokers"] == 2
    router.set_routes("local", [])
    assert router.publish("main", 2)["brokers"] == 1
    assert (ids(local.accepted), ids(remote.accepted)) == ([1], [1, 2])


# -- settlements ------------------------------------------------------------------


def test_when_settled_is_called_once_after_every_route_settled() -> None:
    router = Router()
    a, b = FakeRoute("a", "main"), FakeRoute("b", "main")
    router.set_routes("local", [a, b])
    tallies: list[dict[str, int]] = []
    router.publish("main", "m", tallies.append)
    router.settle("a", a.accepted[0], "acked", "")
    assert tallies == []
    router.settle("b", b.accepted[0], "dead", "boom")
    assert tallies == [{"acked": 1, "dead": 1}]
    router.settle("b", b.accepted[0], "dead", "boom")  # once only
    assert len(tallies) == 1


def test_a_dead_message_becomes_a_letter_on_the_dead_channel() -> None:
    router = Router()
    jobs, grave = FakeRoute("jobs", "main"), FakeRoute("grave", DEAD_CHANNEL)
    router.set_routes("local", [jobs, grave])
    router.publish("main", {"order": 7})
    failed = jobs.accepted[0]
    failed.attempts, failed.errors = 3, ["e1", "e2", "e3"]
    router.settle("jobs", failed, "dead", "e3")
    [letter] = grave.accepted
    assert (letter.id, letter.channel) == (2, DEAD_CHANNEL)
    assert letter.message == {
        "broker": "jobs",
        "id": 1,
        "channel": "main",
        "message": {"order": 7},
        "attempts": 3,
        "errors": ["e1", "e2", "e3"],
        "letter": 1,
    }
    # A letter that dies stays dead: no letter about the letter; the store
    # keeps it, as it keeps the first.
    router.settle("grave", letter, "dead", "no")
    assert grave.accepted == [letter]
    assert router.published == 2
    stored = [(d.id, d.message_id, d.channel, d.broker) for d in letters(router)]
    assert stored == [(1, 1, "main", "jobs"), (2, 2, DEAD_CHANNEL, "grave")]
    # And an ack is no letter at all.
    router.publish("main", "ok")
    router.settle("jobs", jobs.accepted[1], "acked", "")
    assert len(grave.accepted) == 1
    assert len(router.dead_letters) == 2


def letters(router: Router) -> list[DeadLetter]:
    return list(router.dead_letters.letters.values())


def test_a_dead_message_with_no_broker_on_dead_is_kept_not_unrouted() -> None:
    """Before the store, such a message was counted unrouted and gone (its
    content only in log lines)."""
    router = Router()
    jobs = FakeRoute("jobs", "main")
    router.set_routes("local", [jobs])
    heard: list[Any] = []
    router.subscribe(DEAD_CHANNEL, lambda channel, message: heard.append(message))
    router.publish("main", {"order": 8})
    failed = jobs.accepted[0]
    failed.attempts, failed.errors = 2, ["KeyError: 'qty'", "KeyError: 'qty'"]
    router.settle("jobs", failed, "dead", "KeyError: 'qty'")
    assert (router.published, router.unrouted) == (1, 0)
    [letter] = letters(router)
    assert letter.record() == {
        "id": 1,
        "message_id": 1,
        "channel": "main",
        "message": {"order": 8},
        "broker": "jobs",
        "attempts": 2,
        "errors": ["KeyError: 'qty'", "KeyError: 'qty'"],
        "when": letter.when,
    }
    assert time.time() - 60 < letter.when <= time.time()
    # Subscribers of "dead" still hear of it.
    assert [m["letter"] for m in heard] == [1]


def test_a_dead_letter_that_cannot_be_queued_is_logged_and_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    router = Router(strict_channels=True)
    jobs, grave = FakeRoute("jobs", "main"), FakeRoute("grave", DEAD_CHANNEL)
    grave.busy = "grave is full"
    router.set_routes("local", [jobs, grave])
    router.publish("main", "m")
    with caplog.at_level(logging.ERROR, logger="busd"):
        router.settle("jobs", jobs.accepted[0], "dead", "e")
    assert grave.accepted == []
    assert caplog.messages == [
        "Dead letter 1 (message 1 of broker jobs) could not be published on the "
        "'dead' channel (grave is full; try again later); it is kept in the "
        "dead-letter store"
    ]
    assert [d.message for d in letters(router)] == ["m"]
    # strict_channels and no route on "dead": kept, and nothing to say.
    caplog.clear()
    router.set_routes("local", [jobs])
    router.publish("main", "n")
    with caplog.at_level(logging.ERROR, logger="busd"):
        router.settle("jobs", jobs.accepted[1], "dead", "e")
    assert caplog.messages == []
    assert [d.message for d in letters(router)] == ["m", "n"]


def test_publish_needing_a_route_refuses_a_channel_without_one() -> None:
    router = Router()
    with pytest.raises(ProtocolError) as info:
        router.publish("nowhere", "m", needs_route=True)
    assert info.value.code == ErrorCode.UNKNOWN_CHANNEL
    assert info.value.message == "no broker listens on channel 'nowhere'"
    assert (router.published, router.unrouted) == (0, 0)


def test_a_workers_publish_on_a_bad_channel_or_when_busy_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    router = Router(strict_channels=True)
    out = FakeRoute("out", "out")
    router.set_routes("local", [out])
    with caplog.at_level(logging.ERROR, logger="busd"):
        router.publish_from_worker("b:0 (PID 9)", "not a name!", "m")
        router.publish_from_worker("b:0 (PID 9)", "x" * 65, "m")
        router.publish_from_worker("b:0 (PID 9)", "elsewhere", "m")
        out.busy = "full"
        router.publish_from_worker("b:0 (PID 9)", "out", "m")
    assert out.accepted == [] and router.published == 0
    assert caplog.messages[0] == (
        "b:0 (PID 9): its publish on 'not a name!' was refused: "
        "'not a name!' is not a channel name"
    )
    assert "its publish on 'elsewhere' was refused: no broker listens" in caplog.text
    assert "its publish on 'out' was refused: full; try again later" in caplog.text
    out.busy = None
    router.publish_from_worker("b:0 (PID 9)", "out", "m")
    assert ids(out.accepted) == [1]


# -- the spool --------------------------------------------------------------------


def test_publish_is_spooled_and_each_settlement_recorded(tmp_path: Path) -> None:
    router = Router()
    router.use_spool(Spool(str(tmp_path)))
    a, b = FakeRoute("a", "main"), FakeRoute("b", "main")
    router.set_routes("local", [a, b])
    router.publish("main", {"n": 1})
    router.publish("main", {"n": 2})
    router.settle("a", a.accepted[0], "acked", "")
    router.settle("b", b.accepted[0], "dead", "e")
    router.settle("a", a.accepted[1], "acked", "")
    router.close_spool()
    again = Spool(str(tmp_path))
    try:
        assert list(again.pending) == [2]
        assert again.pending[2].brokers == {"b"}
        assert (again.pending[2].channel, again.pending[2].message) == (
            "main",
            {"n": 2},
        )
    finally:
        again.close()


def test_a_dead_message_leaves_the_spool_for_the_dead_letters_file(
    tmp_path: Path,
) -> None:
    router = Router()
    router.use_spool(Spool(str(tmp_path)))
    router.use_dead_letters(DeadLetters(directory=str(tmp_path)))
    jobs = FakeRoute("jobs", "main")
    router.set_routes("local", [jobs])
    router.publish("main", {"n": 1})
    jobs.accepted[0].errors.append("ValueError: no")
    router.settle("jobs", jobs.accepted[0], "dead", "ValueError: no")
    router.close_spool()
    spool, store = Spool(str(tmp_path)), DeadLetters(directory=str(tmp_path))
    try:
        assert spool.pending == {}
        [letter] = store.letters.values()
        assert (letter.message_id, letter.message, letter.errors) == (
            1,
            {"n": 1},
            ["ValueError: no"],
        )
    finally:
        spool.close()
        store.close()


def test_a_dead_letter_the_disk_refuses_stays_in_the_spool(tmp_path: Path) -> None:
    router = Router()
    router.use_spool(Spool(str(tmp_path)))
    store = DeadLetters(directory=str(tmp_path))
    router.use_dead_letters(store)
    jobs = FakeRoute("jobs", "main")
    router.set_routes("local", [jobs])
    router.publish("main", "m")
    assert store._fd is not None
    os.close(store._fd)
    store._fd = os.open("/dev/full", os.O_WRONLY)  # ENOSPC, as a full disk
    router.settle("jobs", jobs.accepted[0], "dead", "e")
    assert len(store) == 1  # in memory, for this run
    router.close_spool()
    again = Spool(str(tmp_path))
    try:
        # Not lost at the next start: delivered again from the spool.
        assert list(again.pending) == [1]
    finally:
        again.close()


def test_settled_everywhere_leaves_nothing_pending(tmp_path: Path) -> None:
    router = Router()
    router.use_spool(Spool(str(tmp_path)))
    a = FakeRoute("a", "main")
    router.set_routes("local", [a])
    router.publish("main", "m")
    router.settle("a", a.accepted[0], "acked", "")
    router.close_spool()
    again = Spool(str(tmp_path))
    try:
        assert again.pending == {}
        assert again.last_id == 1
    finally:
        again.close()


def test_an_unsettled_message_is_restored_flagged_on_the_first_set_routes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = Spool(str(tmp_path))
    before.accept(4, "main", "four", ["a", "b", "gone"])
    before.accept(5, "main", "five", ["a"])
    before.accept(6, "main", "six", ["a"])
    before.settle(4, "b")
    before.settle(6, "a")
    before.close()

    router = Router()
    router.use_spool(Spool(str(tmp_path)))
    a, b = FakeRoute("a", "main"), FakeRoute("b", "main")
    with caplog.at_level(logging.ERROR, logger="busd"):
        router.set_routes("local", [a, b])
    assert [(d.id, d.channel, d.message, d.redelivered) for d in a.restored] == [
        (4, "main", "four", True),
        (5, "main", "five", True),
    ]
    assert b.restored == [] and a.accepted == []
    # The gone broker's share is a dead letter, not a spool entry for ever.
    assert caplog.messages == [
        "Spooled message 4 is for broker gone, which is no longer configured; "
        "it is dead letter 1 (`busctl dead show 1`)"
    ]
    [letter] = router.dead_letters.letters.values()
    assert (letter.message_id, letter.channel, letter.message, letter.broker) == (
        4,
        "main",
        "four",
        "gone",
    )
    assert letter.errors == [
        "broker gone is no longer configured (found in the spool at start)"
    ]
    router.set_routes("local", [a, b])  # once only
    assert len(a.restored) == 2
    assert router.publish("main", "new")["id"] == 7  # after the spool's last
    router.settle("a", a.restored[0], "acked", "")
    router.close_spool()
    again = Spool(str(tmp_path))
    try:
        assert sorted(again.pending) == [5, 7]  # 4: a acked it, gone's is dead
    finally:
        again.close()


def test_a_broker_gone_from_the_config_does_not_keep_the_others_waiting(
    tmp_path: Path,
) -> None:
    before = Spool(str(tmp_path))
    before.accept(1, "main", "one", ["a-gone", "b"])  # the gone one sorts first
    before.accept(2, "main", "two", ["a-gone", "b"])
    before.close()
    router = Router()
    router.use_spool(Spool(str(tmp_path)))
    b = FakeRoute("b", "main")
    router.set_routes("local", [b])
    assert ids(b.restored) == [1, 2]
    router.close_spool()


def test_closing_the_spool_is_final_and_harmless_twice(tmp_path: Path) -> None:
    Router().close_spool()  # no spool: nothing to do
    router = Router()
    router.use_spool(Spool(str(tmp_path)))
    a = FakeRoute("a", "main")
    router.set_routes("local", [a])
    router.publish("main", "spooled")
    router.close_spool()
    router.close_spool()
    # Closed means closed: a publish after it (during the stop) is not spooled.
    assert router.publish("main", "late")["id"] == 2
    router.settle("a", a.accepted[0], "acked", "")
    assert ids(a.accepted) == [1, 2]
    again = Spool(str(tmp_path))
    try:
        assert sorted(again.pending) == [1]
    finally:
        again.close()


def test_a_spool_that_cannot_record_makes_publish_busy(tmp_path: Path) -> None:
    class FullSpool(Spool):
        def accept(self, *args: Any) -> None:
            raise SpoolError("cannot write the spool: No space left on device")

    router = Router()
    spool = FullSpool(str(tmp_path))
    router.use_spool(spool)
    a = FakeRoute("a", "main")
    router.set_routes("local", [a])
    with pytest.raises(ProtocolError) as refusal:
        router.publish("main", "m")
    assert refusal.value.code == ErrorCode.BUSY
    assert refusal.value.message.endswith("; the message was not accepted")
    assert a.accepted == [] and router.published == 0
    router.close_spool()


# -- with real brokers ---------------------------------------------------------------


async def brokers(h: Harness, router: Router, *configs: Any) -> list[Broker]:
    """Running brokers, the router's local routes (as the supervisor does)."""
    h.use_router(router)
    made = [Broker(c, h.services) for c in configs]
    router.set_routes("local", made)
    for broker in made:
        await broker.scale(broker.config.instances)
        for index in range(broker.config.instances):
            h.launcher.current(broker.name, index).ready()
    return made


def test_a_message_nacked_too_often_reaches_the_dead_channels_broker() -> None:
    router = Router()
    heard: list[Any] = []
    router.subscribe(DEAD_CHANNEL, lambda channel, message: heard.append(message))

    async def scenario(h: Harness) -> None:
        await brokers(
            h,
            router,
            broker_config("jobs", max_retries=1),
            broker_config("grave", channels=(DEAD_CHANNEL,), max_retries=0),
        )
        jobs, grave = h.launcher.current("jobs", 0), h.launcher.current("grave", 0)
        tallies: list[dict[str, int]] = []
        router.publish("main", {"order": 1}, tallies.append)
        for attempt in (1, 2):
            await wait_until(lambda n=attempt: len(jobs.deliveries()) == n, "it")
            jobs.nack(1, f"KeyError {attempt}")
        assert tallies == [{"acked": 0, "dead": 1}]
        await wait_until(lambda: grave.deliveries(), "the dead letter")
        [frame] = grave.deliveries()
        letter = {
            "broker": "jobs",
            "id": 1,
            "channel": "main",
            "message": {"order": 1},
            "attempts": 2,
            "errors": ["KeyError 1", "KeyError 2"],
            "letter": 1,
        }
        assert (frame["id"], frame["channel"], frame["message"]) == (
            2,
            DEAD_CHANNEL,
            letter,
        )
        assert heard == [letter]
        grave.nack(2, "cannot file it")  # the letter dies: that is the end
        assert h.settled[-1] == ("grave", 2, "dead", "cannot file it")
        assert router.published == 2
        assert heard == [letter]
        assert len(grave.deliveries()) == 1
        # Both are kept: the message, and the letter that died on "dead".
        assert [(d.channel, d.broker) for d in letters(router)] == [
            ("main", "jobs"),
            (DEAD_CHANNEL, "grave"),
        ]

    run(scenario)


def test_one_full_broker_refuses_the_message_for_both_no_ids_duplicated() -> None:
    router = Router()

    async def scenario(h: Harness) -> None:
        slow, fast = await brokers(
            h,
            router,
            broker_config("slow", queue_size=1, max_inflight=1),
            broker_config("fast", queue_size=100, max_inflight=100),
        )
        ps, pf = h.launcher.current("slow", 0), h.launcher.current("fast", 0)
        assert router.publish("main", "m1")["brokers"] == 2  # slow holds it
        assert router.publish("main", "m2")["id"] == 2  # slow queues it
        for _ in range(3):
            with pytest.raises(ProtocolError) as refusal:
                router.publish("main", "m3")
            assert refusal.value.code == ErrorCode.BUSY
            assert "broker 'slow' has 1 messages queued" in refusal.value.message
        assert (slow.accepted, fast.accepted) == (2, 2)
        ps.ack(1)  # room again
        assert router.publish("main", "m3")["id"] == 3
        await wait_until(lambda: len(pf.deliveries()) == 3, "fast's deliveries")
        ps.ack(2)
        ps.ack(3)
        assert ps.delivered_ids() == pf.delivered_ids() == [1, 2, 3]

    run(scenario)


def test_a_wait_to_a_broker_with_no_instance_able_to_run_is_refused() -> None:
    router = Router()

    async def scenario(h: Harness) -> None:
        (broker,) = await brokers(h, router, broker_config("b", instances=2))
        first, second = broker.instances
        tallies: list[dict[str, int]] = []
        await first.stop()
        # One instance that runs is enough.
        assert router.publish("main", "m1", tallies.append)["brokers"] == 1
        h.process(second).auto_exit = False
        h.process(second).exit(1)  # a crash: BACKOFF, a restart is due
        await wait_until(lambda: second.state is S.BACKOFF, "BACKOFF")
        assert router.publish("main", "m2", tallies.append)["brokers"] == 1
        await second.stop()
        with pytest.raises(ProtocolError) as refusal:
            router.publish("main", "m3", tallies.append)
        assert refusal.value.code == ErrorCode.UNAVAILABLE
        assert refusal.value.message == (
            "no instance of broker 'b' can run: b:0 STOPPED, b:1 STOPPED "
            "(`busctl start b` starts them; `busctl logs b` says why they "
            "stopped); the message was not accepted"
        )
        assert broker.accepted == 2
        await broker.scale(0)
        with pytest.raises(ProtocolError, match="broker 'b' has no instances"):
            router.publish("main", "m4", tallies.append)
        await broker.scale(1)  # STARTING: it will run
        assert router.publish("main", "m5", tallies.append)["id"] == 3

    run(scenario)


def test_wait_tally_counts_each_brokers_outcome_then_answers_once() -> None:
    router = Router()

    async def scenario(h: Harness) -> None:
        await brokers(
            h,
            router,
            broker_config("a"),
            broker_config("b", max_retries=0),
            broker_config("c"),
        )
        pa, pb, pc = (h.launcher.current(n, 0) for n in "abc")
        tallies: list[dict[str, int]] = []
        assert router.publish("main", "m", tallies.append)["brokers"] == 3
        await wait_until(lambda: pc.deliveries(), "the deliveries")
        pa.ack(1)
        pb.nack(1, "no")
        assert tallies == []
        pc.ack(1)
        assert tallies == [{"acked": 2, "dead": 1}]

    run(scenario)


def test_a_workers_publish_goes_through_the_router_to_another_broker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    router = Router()

    async def scenario(h: Harness) -> None:
        await brokers(
            h,
            router,
            broker_config("src"),
            broker_config("sink", channels=("out",)),
        )
        src, sink = h.launcher.current("src", 0), h.launcher.current("sink", 0)
        src.publish("out", {"x": 1})
        await wait_until(lambda: sink.deliveries(), "the delivery")
        assert [(f["channel"], f["message"]) for f in sink.deliveries()] == [
            ("out", {"x": 1})
        ]
        with caplog.at_level(logging.ERROR, logger="busd"):
            src.publish("out put", "bad")  # refused, and logged
        assert f"src:0 (PID {src.pid}): its publish on 'out put' was refused" in (
            caplog.text
        )
        assert router.published == 1
        src.ready()  # the worker goes on: nothing broke
        src.publish("out", "again")
        await wait_until(lambda: len(sink.deliveries()) == 2, "the second")

    run(scenario)


def test_spooled_with_brokers_acked_then_gone_from_the_spool(tmp_path: Path) -> None:
    router = Router()
    router.use_spool(Spool(str(tmp_path)))

    async def scenario(h: Harness) -> None:
        await brokers(h, router, broker_config("a"), broker_config("b"))
        pa, pb = h.launcher.current("a", 0), h.launcher.current("b", 0)
        router.publish("main", "m1")
        router.publish("main", "m2")
        await wait_until(lambda: len(pb.deliveries()) == 2, "the deliveries")
        pa.ack(1, 2)
        pb.ack(1)

    run(scenario)
    router.close_spool()
    spool = Spool(str(tmp_path))
    pending = {i: e.brokers for i, e in spool.pending.items()}
    spool.close()
    assert pending == {2: {"b"}}

    # busd starts again: the unsettled message goes to b, flagged.
    again = Router()
    again.use_spool(Spool(str(tmp_path)))

    async def restart(h: Harness) -> None:
        h.use_router(again)
        a, b = (
            Broker(broker_config("a"), h.services),
            Broker(broker_config("b"), h.services),
        )
        again.set_routes("local", [a, b])  # before the workers start
        for broker in (a, b):
            await broker.scale(1)
            h.launcher.current(broker.name, 0).ready()
        pb = h.launcher.current("b", 0)
        assert [(f["id"], f["redelivered"]) for f in pb.deliveries()] == [(2, True)]
        assert h.launcher.current("a", 0).deliveries() == []
        pb.ack(2)
        assert again.publish("main", "m3")["id"] == 3

    run(restart)
    again.close_spool()
    spool = Spool(str(tmp_path))
    pending = {i: e.brokers for i, e in spool.pending.items()}
    spool.close()
    assert pending == {3: {"a", "b"}}
