"""busd.Bus on its own: subscriptions, publish rules, the state machine."""

import logging
import threading

import pytest
from helpers import record_log

import busd
from busd import Bus, ChannelFailures, states


def test_states_and_default_channels():
    bus = Bus()
    assert bus.state is states.STOPPED
    assert repr(states.STARTED) == "states.STARTED"
    assert set(bus.listeners) == {"start", "stop", "exit", "graceful", "log", "main"}


def test_wspbus_module_exposes_the_same_names():
    from busd import wspbus

    assert wspbus.Bus is Bus
    assert wspbus.states is states
    assert wspbus.ChannelFailures is ChannelFailures
    assert isinstance(wspbus.bus, Bus)
    assert busd.Bus is Bus


def test_priority_order_and_ties_in_subscription_order():
    bus = Bus()
    calls = []
    bus.subscribe("main", lambda: calls.append("b50"))
    bus.subscribe("main", lambda: calls.append("a10"), priority=10)
    bus.subscribe("main", lambda: calls.append("c50"))

    def by_attribute():
        calls.append("d5")

    by_attribute.priority = 5
    bus.subscribe("main", by_attribute)
    bus.publish("main")
    assert calls == ["d5", "a10", "b50", "c50"]


def test_subscribe_returns_callback_and_works_as_decorator():
    bus = Bus()

    @bus.subscribe("main")
    def tick():
        return "ticked"

    assert tick() == "ticked"  # still the function, not None
    assert bus.publish("main") == ["ticked"]

    @bus.subscribe("main", priority=1)
    def first():
        return "first"

    assert bus.publish("main") == ["first", "ticked"]


def test_resubscribe_changes_priority_without_duplicating():
    bus = Bus()
    calls = []

    def a():
        calls.append("a")

    def b():
        calls.append("b")

    bus.subscribe("main", a, priority=10)
    bus.subscribe("main", b, priority=20)
    bus.subscribe("main", a, priority=30)
    bus.publish("main")
    assert calls == ["b", "a"]


def test_resubscribe_at_the_same_priority_moves_behind_its_equals():
    bus = Bus()
    calls = []

    def a():
        calls.append("a")

    def b():
        calls.append("b")

    bus.subscribe("main", a)
    bus.subscribe("main", b)
    bus.publish("main")
    bus.subscribe("main", a)
    bus.publish("main")
    assert calls == ["a", "b", "b", "a"]
    assert len(bus.listeners["main"]) == 2


def test_unsubscribe_and_unknown_channel():
    bus = Bus()
    results = []
    bus.subscribe("custom", results.append)
    bus.publish("custom", 1)
    bus.unsubscribe("custom", results.append)
    bus.unsubscribe("custom", results.append)  # twice is harmless
    assert bus.publish("custom", 2) == []
    assert bus.publish("nobody-listens") == []
    assert results == [1]


def test_failures_are_collected_after_all_listeners_ran():
    bus = Bus()
    lines = record_log(bus)
    ran = []

    def bad():
        raise ValueError("boom")

    bus.subscribe("main", bad, priority=1)
    bus.subscribe("main", lambda: ran.append("after"), priority=2)
    with pytest.raises(ChannelFailures) as info:
        bus.publish("main")
    assert ran == ["after"]
    assert [type(e) for e in info.value.get_instances()] == [ValueError]
    assert str(info.value) == "ValueError('boom')"
    error_lines = [(m, lvl) for m, lvl in lines if lvl == logging.ERROR]
    assert len(error_lines) == 1
    assert error_lines[0][0].startswith("Error in 'main' listener ")
    assert "ValueError: boom" in error_lines[0][0]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_interrupts_pass_through_at_once(exc):
    bus = Bus()
    ran = []

    def stop():
        raise exc

    bus.subscribe("main", stop, priority=1)
    bus.subscribe("main", lambda: ran.append("later"), priority=2)
    with pytest.raises(exc):
        bus.publish("main")
    assert ran == []


def test_system_exit_zero_after_failures_becomes_one():
    bus = Bus()

    def bad():
        raise RuntimeError

    def leave():
        raise SystemExit(0)

    bus.subscribe("main", bad, priority=1)
    bus.subscribe("main", leave, priority=2)
    with pytest.raises(SystemExit) as info:
        bus.publish("main")
    assert info.value.code == 1


def test_lifecycle_log_lines_and_states():
    bus = Bus()
    lines = record_log(bus)
    seen = []
    for channel in ("start", "stop", "exit", "graceful"):
        bus.subscribe(channel, lambda ch=channel: seen.append((ch, bus.state)))
    bus.start()
    assert bus.state is states.STARTED
    bus.graceful()
    bus.exit()
    assert bus.state is states.EXITING
    assert seen == [
        ("start", states.STARTING),
        ("graceful", states.STARTED),
        ("stop", states.STOPPING),
        ("exit", states.EXITING),
    ]
    assert [m for m, _ in lines] == [
        "Bus STARTING",
        "Bus STARTED",
        "Bus graceful",
        "Bus STOPPING",
        "Bus STOPPED",
        "Bus EXITING",
        "Bus EXITED",
    ]
    assert {lvl for _, lvl in lines} == {logging.INFO}


def test_wait_returns_when_another_thread_changes_state():
    bus = Bus()
    ticks = []
    bus.subscribe("main", lambda: ticks.append(1))
    starter = threading.Thread(target=bus.start)
    starter.start()
    bus.wait(states.STARTED, interval=0.01, channel="main")
    starter.join(10)
    assert bus.state is states.STARTED
    bus.exit()


def test_wait_accepts_several_states():
    bus = Bus()
    bus.wait([states.STOPPED, states.STARTED], interval=0.01)
    assert bus.state is states.STOPPED


class FilteringBus(Bus):
    """Code written for CherryPy filters a bus by overriding ``publish``."""

    def __init__(self, dropped):
        super().__init__()
        self.dropped = dropped
        self.seen = []

    def publish(self, channel, *args, **kwargs):
        self.seen.append(channel)
        if channel in self.dropped:
            return []
        return super().publish(channel, *args, **kwargs)


def test_a_publish_override_sees_and_can_filter_every_transition():
    bus = FilteringBus(dropped={"start", "log"})
    ran = []
    for channel in ("start", "stop", "graceful", "exit"):
        bus.subscribe(channel, lambda ch=channel: ran.append(ch))
    bus.start()
    bus.graceful()
    bus.exit()
    assert bus.state is states.EXITING
    assert ran == ["graceful", "stop", "exit"]  # start filtered out
    assert bus.seen == [
        "log", "start", "log",
        "log", "graceful",
        "log", "stop", "log", "log", "exit", "log",
    ]  # fmt: skip


def test_publish_start_outside_start_runs_every_listener():
    # Only start() ends at the first failing start listener; publishing on
    # the start channel by hand keeps the ordinary rule (everyone runs).
    bus = Bus()
    record_log(bus)
    ran = []

    def bad():
        raise ValueError("boom")

    bus.subscribe("start", bad, priority=10)
    bus.subscribe("start", lambda: ran.append("later"), priority=20)
    with pytest.raises(ChannelFailures):
        bus.publish("start")
    assert ran == ["later"]
