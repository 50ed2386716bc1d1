"""Instance in-process: a worker's states, frames, exits and restarts.

Each test drives one ``Instance`` (busd/supervision/instance.py) with a
fake worker process (tests/core_fakes.py) and a recording pool, on the
loop of one ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time

import pytest
from core_fakes import (
    FAST,
    FakePool,
    Harness,
    after_timers,
    broker_config,
    busd_log,
    run,
    turns,
    wait_until,
)

from busd.config import Restart
from busd.supervision.delivery import Delivery
from busd.supervision.instance import Instance, backoff_delay
from busd.supervision.pipes import MAX_LOG_LINE, WORKER_MAX_FRAME
from busd.supervision.states import ALLOWED, InstanceState

S = InstanceState


def make(h: Harness, **config: object) -> tuple[Instance, FakePool]:
    pool = FakePool()
    return Instance(broker_config(**config), 0, pool, h.services), pool


async def running(h: Harness, **config: object) -> tuple[Instance, FakePool]:
    instance, pool = make(h, **config)
    await instance.start()
    h.process(instance).ready()
    assert instance.state is S.RUNNING
    return instance, pool


# -- states ------------------------------------------------------------------------


def test_a_life_follows_the_diagram_and_each_change_is_announced() -> None:
    seen: list[tuple[S, S]] = []

    async def scenario(h: Harness) -> None:
        instance, pool = make(h)
        await instance.start()
        assert instance.state is S.STARTING
        process = h.process(instance)
        assert process.stderr_limit == MAX_LOG_LINE
        assert instance.pid == process.pid
        process.ready()
        assert instance.state is S.RUNNING
        assert pool.dispatches == 1  # room for messages now
        process.ready()  # a second "ready" changes nothing
        assert instance.state is S.RUNNING
        assert pool.dispatches == 1
        await instance.stop()
        assert instance.state is S.STOPPED
        assert process.frames() == [{"type": "stop"}]
        assert process.stdin is not None and process.stdin.closed
        assert process.signals == []  # it went when asked
        assert instance.pid is None
        assert instance.last_exit == "exit status 0"
        seen.extend((old, new) for _, old, new, _ in h.transitions)

    run(scenario)
    assert seen == [
        (S.STOPPED, S.STARTING),
        (S.STARTING, S.RUNNING),
        (S.RUNNING, S.STOPPING),
        (S.STOPPING, S.STOPPED),
    ]


def test_crash_backoff_restart_stop_fatal_start_in_the_diagrams_order() -> None:
    async def scenario(h: Harness) -> None:
        instance, _ = await running(h, restart=Restart.ALWAYS, start_retries=2)
        h.process(instance).exit(1)
        await wait_until(lambda: len(h.launcher.processes) == 2, "the restart")
        assert instance.restarts == 1
        h.process(instance).ready()
        await instance.stop()
        # Stop and start alone do not forget failed starts (busctl's do,
        # with reset()): this series goes on from 1 to 3, FATAL.
        await instance.start()
        h.process(instance).exit(1)
        await wait_until(lambda: len(h.launcher.processes) == 4, "the restart")
        h.process(instance).exit(1)
        await wait_until(lambda: instance.state is S.FATAL, "FATAL")
        instance.reset()
        await instance.start()
        assert instance.state is S.STARTING
        h.process(instance).exit(1)
        await wait_until(lambda: instance.state is S.BACKOFF, "BACKOFF")
        await instance.stop()  # in BACKOFF: stopped at once
        assert h.reasons("b:0", S.STOPPED)[-1] == "stopped while not running"

        states = h.states("b:0")
        assert states == [
            S.STOPPED,
            S.STARTING,
            S.RUNNING,
            S.BACKOFF,
            S.STARTING,
            S.RUNNING,
            S.STOPPING,
            S.STOPPED,
            S.STARTING,
            S.BACKOFF,
            S.STARTING,
            S.FATAL,
            S.STARTING,
            S.BACKOFF,
            S.STOPPED,
        ]
        for old, new in itertools.pairwise(states):
            assert new in ALLOWED[old], (old, new)

    run(scenario)


def test_state_changed_sees_the_new_state_already() -> None:
    async def scenario(h: Harness) -> None:
        instance, _ = make(h)
        looked: list[tuple[S, S]] = []

        def state_changed(view: object, old: S, reason: str) -> None:
            looked.append((old, instance.state))

        services = h.services._replace(state_changed=state_changed)
        instance.services = services
        await instance.start()
        h.process(instance).ready()
        assert looked == [(S.STOPPED, S.STARTING), (S.STARTING, S.RUNNING)]

    run(scenario)


def test_a_move_the_diagram_lacks_is_refused() -> None:
    async def scenario(h: Harness) -> None:
        instance, _ = make(h)
        with pytest.raises(RuntimeError, match="STOPPED -> RUNNING"):
            instance.change_state(S.RUNNING)
        assert instance.state is S.STOPPED
        assert h.transitions == []
        instance.change_state(S.STOPPED)  # no move, no announcement
        assert h.transitions == []

    run(scenario)


# -- restart policy, backoff, FATAL -----------------------------------------------


def test_failed_starts_back_off_doubling_then_give_fatal_past_start_retries():
    async def scenario(h: Harness) -> None:
        instance, _ = make(h, start_retries=3)
        await instance.start()
        for count in range(1, 5):
            # It dies before it said ready: a failed start.
            h.launcher.processes[-1].exit(3)
            await wait_until(lambda c=count: instance.failures == c, f"failure {count}")
            if count < 4:
                await wait_until(
                    lambda c=count: len(h.launcher.processes) == c + 1, "restart"
                )
        assert instance.state is S.FATAL
        assert h.reasons("b:0", S.BACKOFF) == [
            "failed start 1 in a row, next try in 0.001 s",
            "failed start 2 in a row, next try in 0.002 s",
            "failed start 3 in a row, next try in 0.004 s",
        ]
        assert h.reasons("b:0", S.FATAL) == ["4 failed starts"]
        assert instance.restarts == 3
        assert instance.last_exit == "exit status 3"
        assert instance.exit_cause == "exit status 3 before it was ready"
        assert instance.condition() == "FATAL (4 failed starts)"
        assert (instance.retry_at, instance.can_run(), instance.wanted) == (
            None,
            False,
            True,
        )
        # FATAL stays: no restart is pending.
        await after_timers(0.02)
        assert len(h.launcher.calls) == 4

    run(scenario)


def test_the_backoff_delay_stops_doubling_at_its_cap() -> None:
    async def scenario(h: Harness) -> None:
        instance, _ = make(h, backoff_max=0.003)
        await instance.start()
        for count in range(1, 4):
            h.launcher.processes[-1].exit(1)
            await wait_until(
                lambda c=count: len(h.launcher.processes) == c + 1, "restart"
            )
        assert h.reasons("b:0", S.BACKOFF) == [
            "failed start 1 in a row, next try in 0.001 s",
            "failed start 2 in a row, next try in 0.002 s",
            "failed start 3 in a row, next try in 0.003 s",
        ]

    run(scenario)


def test_a_worker_that_ran_backoff_reset_seconds_starts_a_new_series() -> None:
    async def scenario(h: Harness) -> None:
        instance, _ = make(h, backoff_reset=0.05, start_retries=2)
        await instance.start()
        h.process(instance).exit(1)  # before ready: a failed start
        await wait_until(lambda: len(h.launcher.processes) == 2, "restart")
        process = h.process(instance)
        process.ready()
        process.exit(1)  # at once after ready: a failed start too
        await wait_until(lambda: len(h.launcher.processes) == 3, "restart")
        assert instance.failures == 2
        assert instance.exit_cause is not None
        assert instance.exit_cause.startswith("exit status 1 after 0.0 s running")
        process = h.process(instance)
        process.ready()
        assert instance.ready_at is not None
        ready_at = instance.ready_at
        # It runs longer than backoff_reset after "ready"...
        await wait_until(
            lambda: time.time() - ready_at > 0.06, "the worker to have run a while"
        )
        process.exit(1)  # ...so its death is no failed start: no FATAL.
        await wait_until(lambda: instance.state is not S.RUNNING, "the exit")
        assert instance.state is S.BACKOFF
        assert instance.failures == 0
        assert h.reasons("b:0", S.BACKOFF)[-1] == "next try in 0.001 s"
        assert instance.condition() == "BACKOFF"
        # The new series starts from the first delay, and counts from 1.
        await wait_until(lambda: len(h.launcher.processes) == 4, "restart")
        h.process(instance).exit(1)
        await wait_until(lambda: instance.failures == 1, "a failed start")
        assert h.reasons("b:0", S.BACKOFF)[-1] == (
            "failed start 1 in a row, next try in 0.001 s"
        )

    run(scenario)


@pytest.mark.parametrize(
    ("restart", "status", "after"),
    [
        (Restart.NEVER, 0, S.STOPPED),
        (Restart.NEVER, 1, S.STOPPED),
        (Restart.NEVER, -9, S.STOPPED),
        (Restart.ON_FAILURE, 0, S.STOPPED),
        (Restart.ON_FAILURE, 1, S.BACKOFF),
        (Restart.ON_FAILURE, -15, S.BACKOFF),
        (Restart.ALWAYS, 0, S.BACKOFF),
        (Restart.ALWAYS, 2, S.BACKOFF),
    ],
)
def test_the_restart_policy_after_an_unexpected_exit(
    restart: Restart, status: int, after: S
) -> None:
    async def scenario(h: Harness) -> None:
        # A long backoff: the state after the exit is the one looked at.
        h.services = h.services._replace(timing=FAST._replace(backoff_first=10.0))
        instance, _ = await running(h, restart=restart, backoff_max=10.0)
        h.process(instance).exit(status)
        await wait_until(lambda: instance.state is not S.RUNNING, "the exit")
        assert instance.state is after
        if after is S.STOPPED:
            assert h.reasons("b:0", S.STOPPED) == [f"restart = {restart}"]
        assert instance.pid is None
        await instance.stop()  # cancels a pending restart
        assert instance.state is S.STOPPED

    run(scenario)


@pytest.mark.parametrize(
    "error", [OSError("fork server gone"), ValueError("unknown user 'nobody2'")]
)
def test_a_launch_that_raises_is_a_failed_start(error: Exception) -> None:
    async def scenario(h: Harness) -> None:
        h.launcher.fail_next(error, error)
        instance, _ = make(h, start_retries=1)
        await instance.start()  # does not raise
        assert instance.state is S.BACKOFF
        assert instance.last_exit == f"cannot start: {error}"
        assert instance.exit_cause == f"cannot start: {error}"
        assert instance.failures == 1
        assert instance.process is None
        await wait_until(lambda: instance.state is S.FATAL, "FATAL")
        assert h.states("b:0") == [
            S.STOPPED,
            S.STARTING,
            S.BACKOFF,
            S.STARTING,
            S.FATAL,
        ]
        assert h.launcher.calls == [("b", 0), ("b", 0)]
        assert h.launcher.processes == []
        # busctl start after FATAL: a fresh series, and this launch works.
        instance.reset()
        await instance.start()
        h.process(instance).ready()
        assert instance.state is S.RUNNING

    run(scenario)


def test_a_launch_that_raises_with_restart_never_stops() -> None:
    async def scenario(h: Harness) -> None:
        h.launcher.fail_next(OSError("no fork"))
        instance, _ = make(h, restart=Restart.NEVER)
        await instance.start()
        assert instance.state is S.STOPPED
        assert instance.last_exit == "cannot start: no fork"

    run(scenario)


def test_without_start_retries_a_failing_start_is_retried_for_ever_at_the_cap():
    count = 40  # far past the old limit of 5, and past the doubling's cap

    async def scenario(h: Harness) -> None:
        instance, _ = make(h, backoff_max=0.004)
        await instance.start()
        for attempt in range(1, count + 1):
            h.launcher.processes[-1].exit(1)
            await wait_until(lambda a=attempt: instance.failures == a, "the failure")
            assert instance.state is S.BACKOFF
            assert instance.can_run() and instance.wanted
            await wait_until(
                lambda a=attempt: len(h.launcher.processes) == a + 1, "the restart"
            )
        delays = [r.rsplit(" in ", 1)[1] for r in h.reasons("b:0", S.BACKOFF)]
        assert delays == ["0.001 s", "0.002 s"] + ["0.004 s"] * (count - 2)
        assert S.FATAL not in h.states("b:0")
        assert instance.restarts == count

    run(scenario)


def test_the_backoff_delay_neither_overflows_nor_passes_its_cap() -> None:
    assert [backoff_delay(0.1, 30.0, n) for n in (0, 1, 2, 3, 9, 10)] == [
        0.1,
        0.1,
        0.2,
        0.4,
        25.6,
        30.0,
    ]
    # A crash loop of days: 0.1 * 2 ** 100_000 would not fit a float.
    assert backoff_delay(0.1, 30.0, 100_000) == 30.0


def test_start_retries_0_gives_fatal_at_the_first_failed_start() -> None:
    async def scenario(h: Harness) -> None:
        instance, _ = make(h, start_retries=0)
        await instance.start()
        h.process(instance).exit(2)
        await wait_until(lambda: instance.state is S.FATAL, "FATAL")
        assert h.reasons("b:0", S.FATAL) == ["1 failed start"]
        assert instance.condition() == "FATAL (1 failed start)"
        assert len(h.launcher.calls) == 1

    run(scenario)


@pytest.mark.parametrize(
    ("restart", "status", "after"),
    [
        (Restart.ON_FAILURE, 0, S.BACKOFF),
        (Restart.ON_FAILURE, 1, S.BACKOFF),
        (Restart.ALWAYS, 0, S.BACKOFF),
        (Restart.NEVER, 0, S.STOPPED),
    ],
)
def test_an_exit_before_ready_is_a_failed_start_whatever_its_status(
    restart: Restart, status: int, after: S
) -> None:
    """Was failing (issue 15): ``command = ["/bin/true"]`` with restart =
    on-failure ended STOPPED, taken for a clean exit, its queue growing with
    nothing said."""

    async def scenario(h: Harness) -> None:
        h.services = h.services._replace(timing=FAST._replace(backoff_first=10.0))
        instance, _ = make(h, restart=restart, backoff_max=10.0)
        await instance.start()
        h.process(instance).exit(status)
        await wait_until(lambda: instance.state is not S.STARTING, "the exit")
        assert instance.state is after
        cause = f"exit status {status} before it was ready"
        assert instance.exit_cause == cause
        # Still wanted: under "never" it stays down, but health asks for it.
        assert instance.wanted
        if after is S.BACKOFF:
            assert instance.failures == 1
            assert h.reasons("b:0", S.BACKOFF) == [
                "failed start 1 in a row, next try in 10 s"
            ]
            assert instance.can_run()
            assert instance.retry_at is not None
            assert 9 < instance.retry_at - time.monotonic() <= 10
        else:
            assert instance.condition() == f"STOPPED ({cause}; restart = never)"
            assert not instance.can_run()
        await instance.stop()
        assert (instance.wanted, instance.retry_at) == (False, None)

    with busd_log() as log:
        run(scenario)
    assert any(
        level == "ERROR"
        and line.endswith(
            f"exited unexpectedly (exit status {status}) before it was ready"
        )
        for level, line in log.lines
    ), log.lines


@pytest.mark.parametrize("restart", [Restart.ON_FAILURE, Restart.NEVER])
def test_a_clean_exit_after_ready_that_is_not_restarted_is_not_missed(
    restart: Restart,
) -> None:
    async def scenario(h: Harness) -> None:
        instance, _ = await running(h, restart=restart)
        h.process(instance).exit(0)
        await wait_until(lambda: instance.state is S.STOPPED, "STOPPED")
        assert not instance.wanted and not instance.can_run()
        assert instance.condition() == "STOPPED"
        await instance.start()  # busctl start: wanted again
        assert instance.wanted and instance.can_run()

    run(scenario)


def test_restart_keeps_the_instance_wanted_and_able_to_run_throughout() -> None:
    async def scenario(h: Harness) -> None:
        h.launcher.auto_exit = False
        instance, _ = await running(h, start_retries=3)
        instance.failures = 2  # a series that restart() forgets
        first = h.process(instance)
        seen: list[tuple[S, bool, bool]] = []

        def state_changed(view: object, old: S, reason: str) -> None:
            seen.append((instance.state, instance.wanted, instance.can_run()))

        instance.services = h.services._replace(state_changed=state_changed)
        restart = asyncio.create_task(instance.restart())
        await wait_until(lambda: instance.state is S.STOPPING, "STOPPING")
        first.exit(0)
        await restart
        assert seen == [
            (S.STOPPING, True, True),
            (S.STOPPED, True, True),
            (S.STARTING, True, True),
        ]
        assert instance.failures == 0
        # A stop on purpose: not wanted, and it cannot run.
        stop = asyncio.create_task(instance.stop())
        await wait_until(lambda: instance.state is S.STOPPING, "STOPPING")
        assert not instance.wanted and not instance.can_run()
        h.process(instance).exit(0)
        await stop

    run(scenario)


def test_stop_in_backoff_cancels_the_pending_restart() -> None:
    async def scenario(h: Harness) -> None:
        instance, _ = await running(h)
        h.process(instance).exit(1)
        await wait_until(lambda: instance.state is S.BACKOFF, "BACKOFF")
        await instance.stop()
        assert instance.state is S.STOPPED
        await after_timers(5 * FAST.backoff_first)  # the restart was due
        assert len(h.launcher.calls) == 1
        assert instance.state is S.STOPPED

    run(scenario)


def test_stop_in_backoff_holds_even_when_the_restart_timer_just_fired() -> None:
    """Found by this test (fixed): the backoff timer's start() task ran after a
    stop() that came in
    the same loop turn, and starts the stopped instance again."""

    async def scenario(h: Harness) -> None:
        instance, _ = await running(h)
        h.process(instance).exit(1)
        await wait_until(lambda: instance.state is S.BACKOFF, "BACKOFF")
        # The timer fired (restarts counted) but its start() has not run yet.
        await wait_until(
            lambda: instance.restarts == 1 or instance.state is not S.BACKOFF,
            "the backoff timer",
        )
        assert instance.state is S.BACKOFF, "the start() ran first: no window"
        await instance.stop()  # busctl stop, in that loop turn
        assert instance.state is S.STOPPED
        await turns()
        assert instance.state is S.STOPPED, [s.name for s in h.states("b:0")]
        assert len(h.launcher.calls) == 1

    run(scenario)


# -- frames from the worker ----------------------------------------------------------


def test_deliver_sends_a_deliver_frame_once_per_turn_and_counts_attempts() -> None:
    async def scenario(h: Harness) -> None:
        instance, _ = await running(h)
        process = h.process(instance)
        assert process.stdin is not None
        first = Delivery(1, "main", {"k": [1, 2]})
        second = Delivery(2, "main", "two", redelivered=True)
        instance.deliver(first)
        instance.deliver(second)
        assert instance.inflight == {1: first, 2: second}
        assert process.stdin.writes == 0  # the outbox writes on the next turn
        await wait_until(lambda: process.stdin.writes, "the write")
        assert process.stdin.writes == 1  # both frames in one write
        assert process.deliveries() == [
            {
                "type": "deliver",
                "id": 1,
                "channel": "main",
                "message": {"k": [1, 2]},
                "redelivered": False,
                "attempt": 1,
            },
            {
                "type": "deliver",
                "id": 2,
                "channel": "main",
                "message": "two",
                "redelivered": True,
                "attempt": 1,
            },
        ]
        assert first.attempts == 1 and first.sent_at > 0

    run(scenario)


def test_acks_one_by_one_and_many_in_one_frame_and_strange_ids_ignored() -> None:
    async def scenario(h: Harness) -> None:
        instance, pool = await running(h, max_inflight=10)
        process = h.process(instance)
        for i in range(1, 6):
            instance.deliver(Delivery(i, "main", i))
        process.ack(2)
        assert pool.acks == [[2]]
        # 3 once; the rest are not ids it holds (True is not 1, [4] not 4).
        process.ack_many([3, 3, 99, "4", True, 1.0, None, [4], {"id": 5}])
        assert pool.acks == [[2], [3]]
        process.say({"type": "ack", "id": True}, {"type": "ack", "id": [1]})
        process.say({"type": "ack", "ids": 5})  # not a list: ignored
        process.say({"type": "ack"})
        process.say({"type": "bogus", "id": 5})
        assert pool.acks == [[2], [3]]
        process.ack_many([1, 4])
        assert pool.acks == [[2], [3], [1, 4]]
        assert list(instance.inflight) == [5]
        assert instance.acked == 4

    run(scenario)


def test_a_nack_reports_the_delivery_and_its_error() -> None:
    async def scenario(h: Harness) -> None:
        instance, pool = await running(h)
        instance.deliver(Delivery(7, "main", "m"))
        h.process(instance).nack(7, "ValueError: no")
        h.process(instance).nack(7, "again")  # no longer held
        h.process(instance).say({"type": "nack", "id": 8})
        assert pool.nacks == [(7, "ValueError: no")]
        assert instance.nacked == 1
        assert instance.inflight == {}

    run(scenario)


def test_a_workers_publish_goes_to_the_services() -> None:
    async def scenario(h: Harness) -> None:
        instance, _ = await running(h)
        process = h.process(instance)
        process.publish("out", {"x": 1})
        process.publish("", "no channel")
        process.publish(5, "not a name")
        process.say({"type": "publish", "message": "none"})
        assert h.published == [(f"b:0 (PID {process.pid})", "out", {"x": 1})]

    run(scenario)


def test_a_broken_frame_stream_gets_the_worker_killed() -> None:
    async def scenario(h: Harness) -> None:
        instance, _ = await running(h)
        process = h.process(instance)
        assert process.protocol is not None
        process.protocol.data_received(b"\xff\xff\xff\xff")  # 4 GiB frame
        assert process.signals == [signal.SIGKILL]
        await wait_until(lambda: instance.state is not S.RUNNING, "the exit")
        assert instance.last_exit == "killed by SIGKILL"

    run(scenario)


def test_stderr_lines_go_to_log_line() -> None:
    async def scenario(h: Harness) -> None:
        instance, _ = await running(h)
        process = h.process(instance)
        assert process.stderr is not None
        process.stderr.feed_data(b"hello\nERROR: bad\npartial")
        await wait_until(lambda: len(h.log_lines) == 2, "two lines")
        process.exit(0)
        await wait_until(lambda: len(h.log_lines) == 3, "the last line")
        assert h.log_lines == [
            ("b:0", process.pid, "hello"),
            ("b:0", process.pid, "ERROR: bad"),
            ("b:0", process.pid, "partial"),
        ]

    run(scenario)


# -- exits ---------------------------------------------------------------------------


def test_an_unexpected_exit_hands_back_what_was_not_acked_once_out_of_running():
    async def scenario(h: Harness) -> None:
        instance, pool = await running(h, max_inflight=5)
        process = h.process(instance)
        for i in (4, 2, 9):
            instance.deliver(Delivery(i, "main", i))
        # Its last acks are read before its exit is acted on.
        process.ack(2)
        process.exit(1)
        await wait_until(lambda: pool.requeues, "the requeue")
        assert pool.requeues == [([4, 9], S.BACKOFF)]
        assert pool.acks == [[2]]
        assert instance.inflight == {}
        assert instance.last_exit == "exit status 1"
        assert not instance.has_room()

    run(scenario)


def test_acks_read_after_the_exit_status_still_count() -> None:
    async def scenario(h: Harness) -> None:
        instance, pool = await running(h, max_inflight=5)
        process = h.process(instance)
        instance.deliver(Delivery(1, "main", "a"))
        instance.deliver(Delivery(2, "main", "b"))
        process.exit(1, close_stdout=False)  # its status first...
        await wait_until(lambda: process.stderr.at_eof(), "stderr's end")
        await turns()
        assert instance.state is S.RUNNING  # ...not acted on before its stdout
        process.ack(1)  # ...then its last ack, and the end of its stdout
        process.close_stdout()
        await wait_until(lambda: pool.requeues, "the requeue")
        assert pool.acks == [[1]]
        assert pool.requeues == [([2], S.BACKOFF)]

    run(scenario)


def test_an_exit_of_unknown_status_is_said_so() -> None:
    async def scenario(h: Harness) -> None:
        instance, _ = await running(h)
        h.process(instance).exit(None)
        await wait_until(lambda: instance.state is not S.RUNNING, "the exit")
        assert instance.last_exit == "exit status unknown"

    run(scenario)


def test_stop_writes_queued_deliveries_before_the_stop_frame() -> None:
    async def scenario(h: Harness) -> None:
        instance, pool = await running(h, max_inflight=5)
        process = h.process(instance)
        process.auto_exit = False
        instance.deliver(Delivery(1, "main", "a"))
        instance.deliver(Delivery(2, "main", "b"))
        stop = asyncio.create_task(instance.stop())
        await wait_until(lambda: process.stop_requested, "the stop frame")
        assert [f["type"] for f in process.frames()] == ["deliver", "deliver", "stop"]
        assert instance.state is S.STOPPING
        assert not instance.has_room()
        process.ready()  # too late to be ready: ignored
        assert instance.state is S.STOPPING
        process.ack(1)  # it finishes the message in hand, then exits
        process.exit(0)
        await stop
        assert pool.requeues == [([2], S.STOPPING)]
        assert instance.state is S.STOPPED
        assert process.stdin is not None and not process.stdin.late

    run(scenario)


def test_a_stop_right_after_deliveries_writes_them_before_the_stop_frame():
    async def scenario(h: Harness) -> None:
        instance, pool = await running(h, max_inflight=5)
        process = h.process(instance)
        instance.deliver(Delivery(1, "main", "a"))
        instance.deliver(Delivery(2, "main", "b"))
        await instance.stop()  # before the outbox's turn came
        assert [f["type"] for f in process.frames()] == ["deliver", "deliver", "stop"]
        assert process.stdin is not None and not process.stdin.late
        assert pool.requeues == [([1, 2], S.STOPPING)]

    run(scenario)


@pytest.mark.parametrize(
    ("ignore", "signals", "last_exit"),
    [
        ((), [signal.SIGTERM], "killed by SIGTERM"),
        ((signal.SIGTERM,), [signal.SIGTERM, signal.SIGKILL], "killed by SIGKILL"),
    ],
)
def test_stop_sends_sigterm_then_sigkill_to_a_worker_that_stays(
    ignore: tuple[int, ...], signals: list[int], last_exit: str
) -> None:
    async def scenario(h: Harness) -> None:
        h.launcher.auto_exit = False  # it does not leave when asked
        h.launcher.ignore = set(ignore)
        instance, _ = await running(h)
        await instance.stop(timeout=0.02)
        assert h.process(instance).signals == signals
        assert instance.state is S.STOPPED
        assert instance.last_exit == last_exit

    run(scenario)


def test_stop_while_the_launch_is_under_way_waits_for_the_worker_to_stop() -> None:
    """Found by this test (fixed): stop() during the launch returned at once,
    the instance still STOPPING."""

    async def scenario(h: Harness) -> None:
        gate = h.launcher.gate()
        instance, _ = make(h)
        start = asyncio.create_task(instance.start())
        await wait_until(lambda: h.launcher.calls, "the launch")

        async def stop() -> S:
            await instance.stop()
            return instance.state

        stopping = asyncio.create_task(stop())
        # Give stop() turns to return early (a correct one waits on).
        await turns(10)
        gate.set_result(None)
        state_when_stop_returned = await stopping
        await start
        await wait_until(lambda: instance.state is S.STOPPED, "STOPPED")
        assert h.process(instance).stop_requested
        assert state_when_stop_returned is S.STOPPED

    run(scenario)


def test_a_launch_failing_after_stop_was_asked_leaves_the_instance_stopped() -> None:
    """Found by this test (fixed): start() raised RuntimeError
    'no transition STOPPING -> BACKOFF'."""

    async def scenario(h: Harness) -> None:
        gate = h.launcher.gate()
        instance, _ = make(h)
        start = asyncio.create_task(instance.start())
        await wait_until(lambda: h.launcher.calls, "the launch")
        stop = asyncio.create_task(instance.stop())
        await wait_until(lambda: instance.state is S.STOPPING, "STOPPING")
        gate.set_exception(OSError("fork server gone"))
        await start
        await stop
        assert instance.state is S.STOPPED
        assert instance.last_exit == "cannot start: fork server gone"

    run(scenario)


# -- ack_timeout ---------------------------------------------------------------------


def test_check_ack_timeout_kills_a_worker_holding_a_message_too_long() -> None:
    async def scenario(h: Harness) -> None:
        instance, pool = await running(h, ack_timeout=5.0, max_inflight=3)
        process = h.process(instance)
        old, new = Delivery(1, "main", "a"), Delivery(2, "main", "b")
        instance.deliver(old)
        instance.deliver(new)
        new.sent_at = old.sent_at + 3
        instance.check_ack_timeout(old.sent_at + 5.0)  # not past it
        assert process.signals == []
        instance.check_ack_timeout(old.sent_at + 5.5)
        assert process.signals == [signal.SIGKILL]
        assert (old.timeouts, new.timeouts) == (1, 0)
        assert old.errors == [f"not acknowledged within 5 s by b:0 (PID {process.pid})"]
        await wait_until(lambda: pool.requeues, "the requeue")
        assert pool.requeues == [([1, 2], S.BACKOFF)]
        assert instance.last_exit == "killed by SIGKILL"

    run(scenario)


@pytest.mark.parametrize("ack_timeout", [0.0, 5.0])
def test_check_ack_timeout_spares_a_worker_when_it_does_not_apply(
    ack_timeout: float,
) -> None:
    async def scenario(h: Harness) -> None:
        instance, _ = await running(h, ack_timeout=ack_timeout)
        process = h.process(instance)
        instance.check_ack_timeout(1e9)  # nothing in flight
        delivery = Delivery(1, "main", "a")
        instance.deliver(delivery)
        if ack_timeout:
            # STOPPING: the stop's own deadline applies, not ack_timeout.
            process.auto_exit = False
            stop = asyncio.create_task(instance.stop())
            await wait_until(lambda: instance.state is S.STOPPING, "STOPPING")
        instance.check_ack_timeout(delivery.sent_at + 1e6)
        assert process.signals == []
        assert delivery.timeouts == 0
        if ack_timeout:
            process.exit(0)
            await stop

    run(scenario)


def test_a_worker_killed_for_a_timeout_is_not_charged_again_before_it_is_gone():
    """Found by this test (fixed): each check until the exit was seen counted
    one more timeout."""

    async def scenario(h: Harness) -> None:
        instance, _ = await running(h, ack_timeout=5.0, max_retries=1)
        delivery = Delivery(1, "main", "a")
        instance.deliver(delivery)
        late = delivery.sent_at + 6
        instance.check_ack_timeout(late)
        # The supervisor checks again before the exit is seen (a kill and
        # its report take a moment; a worker in D state takes longer).
        instance.check_ack_timeout(late + 0.5)
        assert delivery.timeouts == 1
        assert len(delivery.errors) == 1

    run(scenario)


# -- what the operator reads: the log (docs/runbook.md lists these lines) ----------


def test_the_log_tells_a_workers_life_as_the_runbook_shows_it() -> None:
    async def scenario(h: Harness) -> list[tuple[str, str]]:
        h.launcher.fail_next(OSError("fork server gone"))
        instance, pool = make(
            h, restart=Restart.ALWAYS, max_inflight=5, start_retries=2
        )
        await instance.start()  # cannot start: BACKOFF, then a launch that works
        await wait_until(lambda: h.launcher.processes, "the restart")
        first = h.process(instance)
        first.say({"type": "ack", "id": 1}, {"type": "ready"})
        assert first.protocol is not None
        first.protocol.data_received(b"\0\0\0\1\7")  # a frame holding 7
        first.say({"type": "ack", "ids": 5})
        first.say({"type": "what?"})
        first.publish("", "no channel")
        instance.deliver(Delivery(1, "main", "a"))
        instance.deliver(Delivery(2, "main", "b"))
        first.exit(1)  # soon after ready: a fast failure too
        await wait_until(lambda: len(h.launcher.processes) == 2, "the restart")
        second = h.process(instance)
        second.exit(1)  # before ready
        await wait_until(lambda: instance.state is S.FATAL, "FATAL")
        assert pool.requeues == [([1, 2], S.BACKOFF)]
        instance.reset()
        await instance.start()
        third = h.process(instance)
        third.ready()
        third.auto_exit = False
        await instance.stop(timeout=0.02)
        await instance.start()
        fourth = h.process(instance)
        fourth.ready()
        assert fourth.protocol is not None
        fourth.protocol.data_received(b"\xff\xff\xff\xff")
        await wait_until(lambda: instance.state is not S.RUNNING, "the exit")
        await instance.stop()
        pids = [p.pid for p in (first, second, third, fourth)]
        # Named by their order: P1 is the first worker's PID.
        lines = []
        for level, line in log.lines:
            for i, pid in enumerate(pids, 1):
                line = line.replace(f"PID {pid}", f"PID P{i}")
            lines.append((level, line))
        return lines

    with busd_log() as log:
        lines = run(scenario)
    assert lines == [
        ("ERROR", "b:0: cannot start: fork server gone"),
        ("INFO", "b:0: started, PID P1"),
        (
            "ERROR",
            "b:0 (PID P1): unreadable frame ignored: "
            "frame must hold a msgpack map, got int",
        ),
        ("WARNING", "b:0 (PID P1): ignoring an ack whose 'ids' is not a list"),
        ("WARNING", "b:0 (PID P1): ignoring a frame of unknown type 'what?'"),
        ("WARNING", "b:0 (PID P1): publish without a channel name ignored"),
        ("ERROR", "b:0 (PID P1): exited unexpectedly (exit status 1)"),
        ("WARNING", "b:0: 2 unacknowledged messages go to another instance"),
        ("INFO", "b:0: started, PID P2"),
        (
            "ERROR",
            "b:0 (PID P2): exited unexpectedly (exit status 1) before it was ready",
        ),
        (
            "ERROR",
            "b:0: FATAL after 3 failed starts in a row (start_retries = 2); "
            "`busctl start b:0` tries again",
        ),
        ("INFO", "b:0: started, PID P3"),
        (
            "WARNING",
            "b:0 (PID P3): still running after the stop request; sending SIGTERM",
        ),
        ("INFO", "b:0 (PID P3): stopped (killed by SIGTERM)"),
        ("INFO", "b:0: started, PID P4"),
        (
            "ERROR",
            "b:0 (PID P4): broken frame, stopping it: frame of 4294967295 "
            f"bytes is over the maximum of {WORKER_MAX_FRAME} bytes",
        ),
        ("ERROR", "b:0 (PID P4): exited unexpectedly (killed by SIGKILL)"),
    ]


def test_ack_timeout_is_logged_with_the_message_and_the_limit() -> None:
    async def scenario(h: Harness) -> int:
        instance, _ = await running(h, ack_timeout=2.5)
        delivery = Delivery(7, "main", "a")
        instance.deliver(delivery)
        instance.check_ack_timeout(delivery.sent_at + 3)
        return h.process(instance).pid

    with busd_log() as log:
        pid = run(scenario)
    assert (
        "ERROR",
        f"b:0 (PID {pid}): message 7 not acknowledged within 2.5 s (ack_timeout); "
        "the worker is taken as hung and killed",
    ) in log.lines


# -- what the state answer reads ------------------------------------------------------


def test_an_instance_reports_only_what_it_has_had() -> None:
    async def scenario(h: Harness) -> None:
        instance, _ = make(h)
        # Never started: no PID, no exit (null in `busctl state --json`).
        assert (instance.pid, instance.last_exit) == (None, None)
        assert str(instance) == "b:0"
        before = time.time()
        await instance.start()
        assert instance.started_at is not None
        assert before <= instance.started_at <= time.time()
        h.process(instance).ready()
        await instance.stop()
        assert str(instance) == "b:0"  # no PID once it is gone
        # A change made without a reason announces none.
        assert [r for _, _, new, r in h.transitions if new is not S.STOPPED] == [
            "",
            "",
            "",
        ]

    run(scenario)


def test_a_nack_without_an_error_reports_an_empty_one() -> None:
    async def scenario(h: Harness) -> None:
        instance, pool = await running(h)
        instance.deliver(Delivery(8, "main", "m"))
        h.process(instance).say({"type": "nack", "id": 8})
        assert pool.nacks == [(8, "")]

    run(scenario)


def test_stderr_lines_keep_their_text_and_replace_undecodable_bytes() -> None:
    async def scenario(h: Harness) -> None:
        instance, _ = await running(h)
        process = h.process(instance)
        assert process.stderr is not None
        process.stderr.feed_data(b"  indented\t \nlatin-1 caf\xe9\nends in X\n")
        process.exit(0)
        await wait_until(lambda: len(h.log_lines) == 3, "three lines")
        assert [line for _, _, line in h.log_lines] == [
            "  indented\t ",
            "latin-1 caf\ufffd",
            "ends in X",
        ]

    run(scenario)


# -- writing to a worker that is gone ------------------------------------------------


def test_deliveries_queued_for_a_worker_that_died_meanwhile_are_not_written() -> None:
    async def scenario(h: Harness) -> None:
        h.services = h.services._replace(timing=FAST._replace(backoff_first=10.0))
        instance, pool = await running(h, max_inflight=5, backoff_max=10.0)
        process = h.process(instance)
        with h.outbox.hold():  # the write comes at the end of this read
            instance.deliver(Delivery(1, "main", "a"))
            process.exit(1)
            await wait_until(lambda: pool.requeues, "the requeue")
        assert process.frames() == []
        assert pool.requeues == [([1], S.BACKOFF)]
        await instance.stop()

    run(scenario)


class BrokenStdin:
    """A worker's stdin whose other end is gone: every write raises."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.closed = False

    def write(self, data: bytes) -> None:
        raise self.error

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    "error", [BrokenPipeError(32, "Broken pipe"), RuntimeError("handler is closed")]
)
def test_a_broken_stdin_neither_raises_nor_loses_the_messages(error: Exception) -> None:
    async def scenario(h: Harness) -> None:
        instance, pool = await running(h, max_inflight=5)
        process = h.process(instance)
        process.stdin = BrokenStdin(error)  # type: ignore[assignment]
        instance.deliver(Delivery(1, "main", "a"))
        instance.write_queued()  # as the outbox does
        assert list(instance.inflight) == [1]
        await instance.stop(timeout=0.02)  # the stop frame cannot go either
        assert process.signals == [signal.SIGTERM]
        assert instance.state is S.STOPPED
        assert pool.requeues == [([1], S.STOPPING)]

    run(scenario)


def test_a_worker_gone_before_its_signal_is_no_error() -> None:
    async def scenario(h: Harness) -> None:
        h.launcher.auto_exit = False
        instance, _ = await running(h)
        process = h.process(instance)

        def vanished(signum: int) -> None:
            process.signals.append(signum)
            process.exit(-signum)
            raise ProcessLookupError(3, "No such process")

        process.send_signal = vanished  # type: ignore[method-assign]
        await instance.stop(timeout=0.02)
        assert process.signals == [signal.SIGTERM]
        assert instance.state is S.STOPPED

    run(scenario)


def test_a_stop_that_times_out_during_the_launch_signals_nothing() -> None:
    async def scenario(h: Harness) -> None:
        gate = h.launcher.gate()
        instance, _ = make(h)
        start = asyncio.create_task(instance.start())
        await wait_until(lambda: h.launcher.calls, "the launch")
        stop = asyncio.create_task(instance.stop(timeout=0.01))
        await after_timers(0.02)  # both of the stop's deadlines passed
        assert not stop.done()  # it waits for the worker that is coming
        gate.set_result(None)
        await start
        await stop
        assert instance.state is S.STOPPED
        assert h.process(instance).stop_requested

    run(scenario)


# -- backoff, reset and the stop's deadlines ------------------------------------------


def test_a_stopped_instance_starts_again_after_a_cancelled_backoff() -> None:
    async def scenario(h: Harness) -> None:
        h.services = h.services._replace(timing=FAST._replace(backoff_first=10.0))
        instance, _ = await running(h, backoff_max=10.0)
        h.process(instance).exit(1)
        await wait_until(lambda: instance.state is S.BACKOFF, "BACKOFF")
        await instance.stop()
        await instance.start()
        h.process(instance).exit(1)
        await wait_until(lambda: instance.state is S.BACKOFF, "BACKOFF again")
        await instance.stop()
        await instance.start()
        assert instance.state is S.STARTING

    run(scenario)


def test_reset_starts_a_new_series_from_the_first_backoff_delay() -> None:
    async def scenario(h: Harness) -> None:
        instance, _ = make(h, start_retries=1)
        await instance.start()
        for _ in range(2):
            h.launcher.processes[-1].exit(1)
            await wait_until(lambda: instance.state is not S.STARTING, "the exit")
            await wait_until(lambda: instance.state is not S.BACKOFF, "the restart")
        assert instance.state is S.FATAL
        instance.reset()
        await instance.start()
        h.process(instance).exit(1)
        await wait_until(lambda: instance.state is S.BACKOFF, "BACKOFF")
        assert instance.failures == 1
        assert h.reasons("b:0", S.BACKOFF)[-1] == (
            "failed start 1 in a row, next try in 0.001 s"
        )
        await instance.stop()

    run(scenario)


def test_sigterm_comes_half_way_through_the_stop_timeout_and_sigkill_at_its_end():
    timeout = 0.4

    async def scenario(h: Harness) -> list[float]:
        h.launcher.auto_exit = False
        h.launcher.ignore = {signal.SIGTERM}
        # The config's stop_timeout is far longer: the argument counts.
        instance, _ = await running(h, stop_timeout=60.0)
        process = h.process(instance)
        loop = asyncio.get_running_loop()
        sent: list[float] = []
        signal_worker = process.send_signal

        def send_signal(signum: int) -> None:
            sent.append(loop.time() - began)
            signal_worker(signum)

        process.send_signal = send_signal  # type: ignore[method-assign]
        began = loop.time()
        await instance.stop(timeout=timeout)
        assert process.signals == [signal.SIGTERM, signal.SIGKILL]
        return sent

    sigterm, sigkill = run(scenario)
    # Timers never fire early; a loaded machine may make them late.
    assert timeout / 2 - 0.005 <= sigterm < sigkill
    assert timeout - 0.005 <= sigkill < 2 * timeout
