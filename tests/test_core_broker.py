"""Broker in-process: queue, dispatch, ack/nack/retry, requeue on exit.

Each test builds a ``Broker`` (busd/supervision/broker.py) with real
``Instance``s over fake worker processes (tests/core_fakes.py); settled
deliveries are recorded by the harness (the router is tested with brokers
in test_core_router.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from typing import Any

import pytest
from core_fakes import (
    FakeProcess,
    Harness,
    broker_config,
    busd_log,
    run,
    wait_until,
)

from busd.config import Restart
from busd.supervision.broker import Broker
from busd.supervision.delivery import Delivery
from busd.supervision.states import InstanceState

S = InstanceState


def accept(broker: Broker, *ids: int, outcomes: list[Any] | None = None) -> None:
    for i in ids:
        callback = None if outcomes is None else outcomes.append
        broker.accept(Delivery(i, "main", f"m{i}", callback))


def seen(process: FakeProcess) -> list[tuple[int, int, bool]]:
    """(id, attempt, redelivered) of each deliver frame, in order."""
    return [(f["id"], f["attempt"], f["redelivered"]) for f in process.deliveries()]


async def delivered(process: FakeProcess, count: int) -> None:
    await wait_until(
        lambda: len(process.deliveries()) >= count, f"{count} deliveries to {process}"
    )
    assert len(process.deliveries()) == count, seen(process)


def queued(broker: Broker) -> list[int]:
    return [d.id for d in broker.queue]


# -- ack, nack, retry, dead -------------------------------------------------------


def test_an_ack_settles_the_message_acked_and_counts_it() -> None:
    async def scenario(h: Harness) -> None:
        broker = await h.running_broker(broker_config())
        outcomes: list[str] = []
        accept(broker, 1, outcomes=outcomes)
        process = h.launcher.current("b", 0)
        await delivered(process, 1)
        assert process.deliveries()[0]["message"] == "m1"
        assert h.settled == [] and outcomes == []
        process.ack(1)
        assert h.settled == [("b", 1, "acked", "")]
        assert outcomes == ["acked"]
        assert (broker.accepted, broker.acked_count) == (1, 1)
        assert (broker.retried, broker.dead, broker.redelivered) == (0, 0, 0)
        assert broker.instances[0].acked == 1
        assert broker.instances[0].inflight == {}
        process.ack(1)  # twice: nothing more
        assert len(h.settled) == 1 and broker.acked_count == 1

    run(scenario)


def test_a_nack_retries_at_the_head_of_the_queue_then_gives_up_dead() -> None:
    async def scenario(h: Harness) -> None:
        config = broker_config(max_retries=2, max_inflight=1)
        broker = await h.running_broker(config)
        outcomes: list[str] = []
        accept(broker, 1, 2, 3, outcomes=outcomes)
        first = broker.instances[0].inflight[1]
        process = h.launcher.current("b", 0)
        await delivered(process, 1)
        assert queued(broker) == [2, 3]
        for attempt in (1, 2, 3):
            assert seen(process)[-1] == (1, attempt, False)
            process.nack(1, f"error {attempt}")
            if attempt < 3:
                assert queued(broker) == [2, 3]  # 1 went first again
        # Failed max_retries + 1 = 3 times: dead, and the next one goes.
        assert h.settled == [("b", 1, "dead", "error 3")]
        assert outcomes == ["dead"]
        assert first.attempts == 3
        assert first.errors == ["error 1", "error 2", "error 3"]
        assert (broker.retried, broker.dead) == (2, 1)
        assert broker.instances[0].nacked == 3
        assert seen(process)[-1] == (2, 1, False)
        assert queued(broker) == [3]

    run(scenario)


def test_max_retries_zero_gives_up_at_the_first_nack() -> None:
    async def scenario(h: Harness) -> None:
        broker = await h.running_broker(broker_config(max_retries=0))
        accept(broker, 1)
        await delivered(h.launcher.current("b", 0), 1)
        h.launcher.current("b", 0).nack(1, "no")
        assert h.settled == [("b", 1, "dead", "no")]
        assert broker.retried == 0

    run(scenario)


# -- dispatch -------------------------------------------------------------------------


def test_messages_go_round_robin_skipping_instances_not_running() -> None:
    async def scenario(h: Harness) -> None:
        config = broker_config(instances=3, restart=Restart.NEVER)
        broker = await h.running_broker(config)
        accept(broker, *range(1, 8))
        p0, p1, p2 = (h.launcher.current("b", i) for i in range(3))
        await delivered(p0, 3)
        assert (p0.delivered_ids(), p1.delivered_ids(), p2.delivered_ids()) == (
            [1, 4, 7],
            [2, 5],
            [3, 6],
        )
        p1.ack(2, 5)
        p1.exit(0)  # restart = never: it stays STOPPED
        await wait_until(lambda: broker.instances[1].state is S.STOPPED, "STOPPED")
        accept(broker, 8, 9, 10, 11)
        await delivered(p0, 5)
        assert p0.delivered_ids() == [1, 4, 7, 9, 11]
        assert p2.delivered_ids() == [3, 6, 8, 10]
        assert broker.running() == 2

    run(scenario)


def test_an_instance_never_holds_more_than_max_inflight_unacked() -> None:
    async def scenario(h: Harness) -> None:
        broker = await h.running_broker(broker_config(max_inflight=3))
        instance = broker.instances[0]
        process = h.launcher.current("b", 0)
        acked: list[int] = []

        def outstanding() -> int:
            return len(process.deliveries()) - len(acked)

        accept(broker, *range(1, 9))
        await delivered(process, 3)
        assert queued(broker) == [4, 5, 6, 7, 8]
        steps = [[2], [1, 3], [4], [6, 5], [7]]
        for ids in steps:
            assert len(instance.inflight) <= 3 and outstanding() <= 3
            process.ack_many(ids)
            acked += ids
            assert len(instance.inflight) == min(3, 8 - len(acked))
            assert outstanding() == len(instance.inflight)
        assert process.delivered_ids() == list(range(1, 9))
        assert not broker.queue

    run(scenario)


def test_busy_reason_counts_the_queue_not_the_messages_in_flight() -> None:
    async def scenario(h: Harness) -> None:
        broker = Broker(broker_config(queue_size=2, max_inflight=5), h.services)
        await broker.scale(1)  # STARTING: nothing is dispatched yet
        assert broker.busy_reason() is None
        accept(broker, 1, 2)
        assert broker.busy_reason() == "broker 'b' has 2 messages queued (queue_size 2)"
        h.launcher.current("b", 0).ready()
        assert queued(broker) == []
        assert broker.busy_reason() is None  # two in flight, none queued

    run(scenario)


def test_a_reloaded_config_changes_the_window_of_running_instances() -> None:
    async def scenario(h: Harness) -> None:
        config = broker_config(max_inflight=4)
        broker = await h.running_broker(config)
        process = h.launcher.current("b", 0)
        broker.reconfigure(dataclasses.replace(config, max_inflight=1))
        assert broker.instances[0].config.max_inflight == 1
        accept(broker, 1, 2, 3)
        await delivered(process, 1)
        process.ack(1)
        assert process.delivered_ids() == [1, 2]

    run(scenario)


def test_a_restored_message_waits_for_the_instances_flagged_redelivered() -> None:
    async def scenario(h: Harness) -> None:
        broker = Broker(broker_config(), h.services)
        broker.restore(Delivery(41, "main", "from the spool", redelivered=True))
        assert queued(broker) == [41]
        await broker.scale(1)
        process = h.launcher.current("b", 0)
        process.ready()
        assert seen(process) == [(41, 1, True)]

    run(scenario)


def test_select_refuses_an_instance_the_broker_does_not_have() -> None:
    async def scenario(h: Harness) -> None:
        broker = await h.running_broker(broker_config(instances=2))
        assert broker.select(1) == [broker.instances[1]]
        assert broker.select(None) == broker.instances
        with pytest.raises(LookupError, match="has no instance 2"):
            broker.select(2)
        with pytest.raises(LookupError):
            broker.select(-1)

    run(scenario)


# -- at-least-once: requeue when a worker goes -----------------------------------


def test_a_dead_workers_messages_go_first_to_the_other_instance_flagged() -> None:
    async def scenario(h: Harness) -> None:
        broker = await h.running_broker(broker_config(instances=2, max_inflight=2))
        p0, p1 = h.launcher.current("b", 0), h.launcher.current("b", 1)
        accept(broker, *range(1, 7))
        await delivered(p1, 2)
        assert (p0.delivered_ids(), p1.delivered_ids()) == ([1, 3], [2, 4])
        assert queued(broker) == [5, 6]
        p0.exit(1)  # crash, with 1 and 3 unacknowledged
        await wait_until(lambda: queued(broker) == [1, 3, 5, 6], "the requeue")
        assert broker.instances[0].state is not S.RUNNING
        assert [d.redelivered for d in broker.queue] == [True, True, False, False]
        assert broker.redelivered == 2
        p1.ack(2)
        p1.ack(4)
        p1.ack(1)
        p1.ack(3)
        assert seen(p1) == [
            (2, 1, False),
            (4, 1, False),
            (1, 2, True),
            (3, 2, True),
            (5, 1, False),
            (6, 1, False),
        ]
        # The crashed instance's new worker is not ready: it got nothing.
        await wait_until(lambda: len(h.launcher.of("b", 0)) == 2, "the restart")
        assert h.launcher.current("b", 0).deliveries() == []
        p1.ack(5, 6)
        assert sorted(h.settled_ids()) == [1, 2, 3, 4, 5, 6]

    run(scenario)


def test_stop_hands_unacked_messages_back_first_in_line_none_lost() -> None:
    async def scenario(h: Harness) -> None:
        broker = await h.running_broker(broker_config(instances=2, max_inflight=2))
        p0, p1 = h.launcher.current("b", 0), h.launcher.current("b", 1)
        p0.auto_exit = False
        accept(broker, *range(1, 7))
        await delivered(p1, 2)
        stop = asyncio.create_task(broker.stop(0))
        await wait_until(lambda: p0.stop_requested, "the stop frame")
        assert [f["type"] for f in p0.frames()] == ["deliver", "deliver", "stop"]
        p0.ack(1)  # it finishes the message in hand, then exits
        p0.exit(0)
        await stop
        assert broker.instances[0].state is S.STOPPED
        assert queued(broker) == [3, 5, 6]
        assert [d.redelivered for d in broker.queue] == [True, False, False]
        p1.ack(2, 4)
        assert seen(p1)[2:] == [(3, 2, True), (5, 1, False)]
        p1.ack(3, 5)
        p1.ack(6)
        assert sorted(h.settled_ids()) == [1, 2, 3, 4, 5, 6]
        assert len(h.settled) == 6  # none twice
        assert p0.signals == []

    run(scenario)


def test_a_rolling_restart_redelivers_what_the_old_worker_held_first() -> None:
    async def scenario(h: Harness) -> None:
        broker = await h.running_broker(broker_config(instances=2, max_inflight=2))
        p0, p1 = h.launcher.current("b", 0), h.launcher.current("b", 1)
        accept(broker, *range(1, 7))
        await delivered(p1, 2)
        restart = asyncio.create_task(broker.restart(0))
        await wait_until(lambda: len(h.launcher.of("b", 0)) == 2, "a new worker")
        assert p0.stop_requested and p0.exited
        assert broker.instances[0].last_exit == "exit status 0"
        assert queued(broker) == [1, 3, 5, 6]
        assert not restart.done()  # it waits for the new worker to be ready
        new = h.launcher.current("b", 0)
        new.ready()
        await restart
        assert seen(new) == [(1, 2, True), (3, 2, True)]
        p1.ack(2, 4)
        assert p1.delivered_ids() == [2, 4, 5, 6]
        new.ack(1, 3)
        p1.ack(5, 6)
        assert sorted(h.settled_ids()) == [1, 2, 3, 4, 5, 6]
        assert [i.state for i in broker.instances] == [S.RUNNING, S.RUNNING]

    run(scenario)


def test_scaling_down_stops_the_highest_instances_and_keeps_their_messages():
    async def scenario(h: Harness) -> None:
        broker = await h.running_broker(broker_config(instances=2, max_inflight=2))
        p0, p1 = h.launcher.current("b", 0), h.launcher.current("b", 1)
        accept(broker, *range(1, 7))
        await delivered(p1, 2)
        await broker.scale(1)
        assert len(broker.instances) == 1
        assert p1.stop_requested and p1.exited
        assert queued(broker) == [2, 4, 5, 6]
        p0.ack(1, 3)
        assert seen(p0)[2:] == [(2, 2, True), (4, 2, True)]
        p0.ack(2, 4)
        p0.ack(5, 6)
        assert sorted(h.settled_ids()) == [1, 2, 3, 4, 5, 6]
        # And up again: a new instance 1, which gets messages once ready.
        await broker.scale(2)
        h.launcher.current("b", 1).ready()
        accept(broker, 7, 8)
        await delivered(p0, 7)
        assert h.launcher.current("b", 1).delivered_ids() == [8]

    run(scenario)


def test_a_restart_while_the_worker_is_being_launched_leaves_it_running() -> None:
    """Found by this test (fixed): Broker.restart() of an instance whose launch
    is under way ended with the instance STOPPED: Instance.stop() returned at
    once (nothing to wait for yet) and start() then did nothing (STOPPING is
    alive)."""

    async def scenario(h: Harness) -> None:
        gate = h.launcher.gate()
        broker = Broker(broker_config(), h.services)
        scale = asyncio.create_task(broker.scale(1))
        await wait_until(lambda: h.launcher.calls, "the launch")
        restart = asyncio.create_task(broker.restart(0))
        await wait_until(
            lambda: broker.instances[0].state is S.STOPPING, "the restart's stop"
        )
        gate.set_result(None)
        await scale
        # The first worker goes; a second one is started and says ready.
        await wait_until(
            lambda: restart.done() or len(h.launcher.processes) == 2,
            "the restart to start a new worker",
        )
        if len(h.launcher.processes) == 2:
            h.launcher.processes[1].ready()
        await restart
        assert h.launcher.processes[0].stop_requested
        assert broker.instances[0].state is S.RUNNING, [s.name for s in h.states("b:0")]

    run(scenario)


# -- ack_timeout ----------------------------------------------------------------------


def test_a_hung_worker_is_killed_and_its_message_goes_to_the_other_one() -> None:
    async def scenario(h: Harness) -> None:
        config = broker_config(instances=2, max_inflight=1, ack_timeout=5.0)
        broker = await h.running_broker(config)
        p0, p1 = h.launcher.current("b", 0), h.launcher.current("b", 1)
        accept(broker, 1, 2)
        await delivered(p1, 1)
        p1.ack(2)
        held = broker.instances[0].inflight[1]
        for instance in broker.instances:
            instance.check_ack_timeout(held.sent_at + 4.0)
        assert p0.signals == [] and p1.signals == []
        for instance in broker.instances:
            instance.check_ack_timeout(held.sent_at + 6.0)
        assert p0.signals == [signal.SIGKILL] and p1.signals == []
        await delivered(p1, 2)
        assert seen(p1)[-1] == (1, 2, True)
        assert broker.instances[0].last_exit == "killed by SIGKILL"
        assert held.timeouts == 1
        p1.ack(1)
        assert h.settled[-1] == ("b", 1, "acked", "")

    run(scenario)


def test_a_message_that_hangs_workers_more_than_max_retries_times_is_dead() -> None:
    async def scenario(h: Harness) -> None:
        config = broker_config(ack_timeout=5.0, max_retries=1, restart=Restart.ALWAYS)
        broker = await h.running_broker(config)
        instance = broker.instances[0]
        outcomes: list[str] = []
        accept(broker, 1, outcomes=outcomes)
        poison = instance.inflight[1]
        for hang in (1, 2):
            process = h.launcher.current("b", 0)
            await delivered(process, 1)
            assert seen(process) == [(1, hang, hang > 1)]
            instance.check_ack_timeout(poison.sent_at + 6.0)
            assert process.signals == [signal.SIGKILL]
            await wait_until(
                lambda n=hang: len(h.launcher.of("b", 0)) == n + 1, "the restart"
            )
            h.launcher.current("b", 0).ready()
        assert poison.timeouts == 2
        assert h.settled == [("b", 1, "dead", poison.errors[-1])]
        assert poison.errors[-1].startswith("not acknowledged within 5 s by b:0")
        assert outcomes == ["dead"]
        assert broker.dead == 1 and queued(broker) == []
        assert h.launcher.current("b", 0).deliveries() == []  # not a third time

    run(scenario)


# -- counters, reload, start, and what the log says -----------------------------------


def test_the_counters_add_up_over_frames_and_deaths() -> None:
    async def scenario(h: Harness) -> None:
        broker = await h.running_broker(broker_config(max_retries=0, max_inflight=5))
        process = h.launcher.current("b", 0)
        accept(broker, 1, 2, 3, 4)
        await delivered(process, 4)
        process.ack(1)
        process.ack_many([2])
        process.nack(3, "no")
        process.nack(4, "no")
        assert (broker.accepted, broker.acked_count, broker.dead) == (4, 2, 2)

    run(scenario)


def test_a_reloaded_config_is_the_brokers_from_then_on() -> None:
    async def scenario(h: Harness) -> None:
        config = broker_config(queue_size=10, max_inflight=1)
        broker = await h.running_broker(config)
        broker.reconfigure(dataclasses.replace(config, queue_size=1))
        assert broker.config.queue_size == 1
        accept(broker, 1, 2)  # 1 in flight, 2 queued: the queue is full now
        assert broker.busy_reason() == "broker 'b' has 1 messages queued (queue_size 1)"

    run(scenario)


def test_down_reason_names_each_instance_once_none_can_run() -> None:
    async def scenario(h: Harness) -> None:
        h.launcher.auto_exit = False
        broker = await h.running_broker(broker_config(instances=2, start_retries=0))
        first, second = broker.instances
        h.process(first).exit(3)  # at once after ready: a failed start
        await wait_until(lambda: first.state is S.FATAL, "FATAL")
        assert broker.down_reason() is None  # b:1 runs
        # A restart stops the worker before it starts the next one: the
        # broker is not down meanwhile.
        restart = asyncio.create_task(broker.restart(1))
        await wait_until(lambda: second.state is S.STOPPING, "STOPPING")
        assert broker.down_reason() is None
        h.process(second).exit(0)
        await wait_until(lambda: second.state is S.STARTING, "STARTING")
        assert broker.down_reason() is None
        h.process(second).ready()
        await restart
        stop = asyncio.create_task(broker.stop(1))
        await wait_until(lambda: second.state is S.STOPPING, "STOPPING")
        assert broker.down_reason() is not None  # on its way out, for good
        h.process(second).exit(0)
        await stop
        assert broker.down_reason() == (
            "no instance of broker 'b' can run: b:0 FATAL (1 failed start), "
            "b:1 STOPPED (`busctl start b` starts them; `busctl logs b` says why "
            "they stopped)"
        )
        await broker.start(0)
        assert broker.down_reason() is None

    run(scenario)


def test_start_starts_one_instance_or_every_stopped_one_afresh() -> None:
    async def scenario(h: Harness) -> None:
        broker = await h.running_broker(broker_config(instances=3))
        await broker.stop()
        assert [i.state for i in broker.instances] == [S.STOPPED] * 3
        broker.instances[1].failures = 2  # it had failed before the stop
        await broker.start(1)
        assert [i.state for i in broker.instances] == [
            S.STOPPED,
            S.STARTING,
            S.STOPPED,
        ]
        assert broker.instances[1].failures == 0
        await broker.start()
        assert [i.state for i in broker.instances] == [S.STARTING] * 3
        assert len(h.launcher.of("b", 1)) == 2  # started once again only
        with pytest.raises(LookupError):
            await broker.start(3)
        await broker.stop()

    run(scenario)


def test_a_requeue_that_buries_a_poison_message_hands_back_the_others() -> None:
    async def scenario(h: Harness) -> None:
        broker = await h.running_broker(broker_config(max_retries=1))
        instance = broker.instances[0]
        fine, poison = Delivery(1, "main", "a"), Delivery(2, "main", "b")
        poison.timeouts = 2
        poison.errors = ["nack 1", "not acknowledged within 5 s by b:0 (PID 1)", "last"]
        await instance.stop()  # so that nothing is dispatched meanwhile
        broker.requeue(instance, [fine, poison])
        assert h.settled == [("b", 2, "dead", "last")]
        assert queued(broker) == [1]
        assert fine.redelivered and broker.redelivered == 1

    run(scenario)


def test_retries_and_deaths_are_logged_as_the_runbook_shows_them() -> None:
    async def scenario(h: Harness) -> list[int]:
        config = broker_config(
            ack_timeout=5.0, max_retries=1, max_inflight=1, restart=Restart.ALWAYS
        )
        broker = await h.running_broker(config)
        first = h.launcher.current("b", 0)
        accept(broker, 1, 2)
        await delivered(first, 1)
        first.nack(1, "KeyError: 'x'")  # retried
        await delivered(first, 2)
        first.nack(1, "KeyError: 'y'")  # failed twice: dead
        await delivered(first, 3)
        assert seen(first)[-1] == (2, 1, False)
        # Message 2 hangs this worker and the next: dead too.
        poison = broker.instances[0].inflight[2]
        pids = []
        for hang in (1, 2):
            process = h.launcher.current("b", 0)
            pids.append(process.pid)
            await delivered(process, 3 if process is first else 1)
            broker.instances[0].check_ack_timeout(poison.sent_at + 6.0)
            await wait_until(lambda p=process: p.exited, "the kill")
            await wait_until(
                lambda n=hang: len(h.launcher.of("b", 0)) == n + 1, "restart"
            )
            h.launcher.current("b", 0).ready()
        return pids

    with busd_log(logging.WARNING) as log:
        first, second = run(scenario)
    assert log.lines == [
        (
            "WARNING",
            f"b:0 (PID {first}): message 1 on 'main' failed (attempt 1 of 2), "
            "retrying: KeyError: 'x'",
        ),
        (
            "ERROR",
            f"b:0 (PID {first}): message 1 on 'main' failed 2 times; "
            "sent to the 'dead' channel: KeyError: 'y'",
        ),
        (
            "ERROR",
            f"b:0 (PID {first}): message 2 not acknowledged within 5 s "
            "(ack_timeout); the worker is taken as hung and killed",
        ),
        ("ERROR", f"b:0 (PID {first}): exited unexpectedly (killed by SIGKILL)"),
        ("WARNING", "b:0: 1 unacknowledged messages go to another instance"),
        (
            "ERROR",
            f"b:0 (PID {second}): message 2 not acknowledged within 5 s "
            "(ack_timeout); the worker is taken as hung and killed",
        ),
        ("ERROR", f"b:0 (PID {second}): exited unexpectedly (killed by SIGKILL)"),
        ("WARNING", "b:0: 1 unacknowledged messages go to another instance"),
        (
            "ERROR",
            "b:0: message 2 on 'main' failed 2 times; sent to the 'dead' channel: "
            f"not acknowledged within 5 s by b:0 (PID {second})",
        ),
    ]


# -- a broker going away -------------------------------------------------------------


def test_abandon_settles_every_queued_message_dead_with_the_error() -> None:
    """A broker removed by a reload strands nothing: what it still holds,
    queued or handed back by its stopped instances, is settled dead."""

    async def scenario(h: Harness) -> None:
        broker = await h.running_broker(broker_config(max_inflight=1))
        outcomes: list[str] = []
        accept(broker, 1, 2, 3, outcomes=outcomes)
        await delivered(h.launcher.current("b", 0), 1)
        await broker.stop()  # 1 comes back to the head of the queue
        assert queued(broker) == [1, 2, 3]
        assert broker.abandon("broker b was removed from the config") == 3
        assert h.settled == [
            ("b", i, "dead", "broker b was removed from the config") for i in (1, 2, 3)
        ]
        assert outcomes == ["dead", "dead", "dead"]
        assert queued(broker) == []
        assert broker.dead == 3
        assert broker.abandon("again") == 0  # nothing settled twice
        assert len(h.settled) == 3

    run(scenario)


def test_abandon_records_the_error_on_each_message() -> None:
    async def scenario(h: Harness) -> None:
        broker = Broker(broker_config(), h.services)
        first, second = Delivery(1, "main", "a"), Delivery(2, "main", "b")
        first.errors.append("earlier")
        broker.accept(first)
        broker.accept(second)
        assert broker.abandon("gone") == 2
        assert first.errors == ["earlier", "gone"]
        assert second.errors == ["gone"]

    run(scenario)
