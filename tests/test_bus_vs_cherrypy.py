"""busd.Bus side by side with CherryPy's ``wspbus.Bus``, the reference.

Code written against CherryPy must behave the same on busd, apart from the
improvements listed in the ``busd.bus`` module docstring. Most tests here
run one scenario on both classes and demand the same trace; the tests of
the documented improvements show CherryPy's behaviour next to busd's. What
ends or signals a process (start failure, Ctrl-C, restart, exit status 70)
runs in child processes, one per implementation, started and ended here.

Deliberate differences (listed in busd/bus.py's docstring and docs/bus.md)
are tested on both sides, so that each shows what CherryPy does instead.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
from cherrypy.process import wspbus as cherrypy_wspbus
from cherrypy.process.plugins import SimplePlugin
from helpers import default_sigint, record_log

from busd import bus as busd_bus

IMPLEMENTATIONS = {
    "busd": SimpleNamespace(
        name="busd",
        Bus=busd_bus.Bus,
        ChannelFailures=busd_bus.ChannelFailures,
        states=busd_bus.states,
    ),
    "cherrypy": SimpleNamespace(
        name="cherrypy",
        Bus=cherrypy_wspbus.Bus,
        ChannelFailures=cherrypy_wspbus.ChannelFailures,
        states=cherrypy_wspbus.states,
    ),
}

# Bounds for anything that waits on another thread or process. Generous:
# a test only takes this long when it is about to fail anyway.
DEADLINE = 10.0


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl(request: pytest.FixtureRequest) -> SimpleNamespace:
    return IMPLEMENTATIONS[request.param]


def run_both(scenario: Callable[[SimpleNamespace], Any]) -> Any:
    """Run ``scenario`` on each implementation; demand equal results."""
    results = {name: scenario(api) for name, api in IMPLEMENTATIONS.items()}
    assert results["busd"] == results["cherrypy"]
    return results["busd"]


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_MODULE = re.compile(r"\b(?:busd\.bus|cherrypy\.process\.wspbus)\.")


def normalize(msg: str) -> str:
    """A log message reduced to what both implementations must share.

    Object addresses and the module that defines ``ChannelFailures`` are
    dropped; a traceback becomes its last line (the exception), as its
    frames name each implementation's own source lines.
    """
    msg = _MODULE.sub("", _ADDRESS.sub("", msg))
    head, sep, tail = msg.partition("\nTraceback (most recent call last):\n")
    if not sep:
        return msg
    return f"{head} | {tail.strip().splitlines()[-1]}"


# -- lifecycle: log lines and the states listeners see ----------------------


def test_lifecycle_log_and_states_seen_by_listeners():
    def scenario(api):
        bus = api.Bus()
        trace = []
        bus.subscribe(
            "log", lambda msg, level: trace.append(("log", msg, level, repr(bus.state)))
        )
        for channel in ("start", "stop", "graceful", "exit"):
            bus.subscribe(
                channel, lambda ch=channel: trace.append((ch, repr(bus.state)))
            )
        bus.start()
        bus.graceful()
        bus.stop()
        bus.start()
        bus.exit()
        trace.append(("final", repr(bus.state)))
        return trace

    trace = run_both(scenario)
    assert trace == [
        ("log", "Bus STARTING", 20, "states.STARTING"),
        ("start", "states.STARTING"),
        ("log", "Bus STARTED", 20, "states.STARTED"),
        ("log", "Bus graceful", 20, "states.STARTED"),
        ("graceful", "states.STARTED"),
        ("log", "Bus STOPPING", 20, "states.STOPPING"),
        ("stop", "states.STOPPING"),
        ("log", "Bus STOPPED", 20, "states.STOPPED"),
        ("log", "Bus STARTING", 20, "states.STARTING"),
        ("start", "states.STARTING"),
        ("log", "Bus STARTED", 20, "states.STARTED"),
        ("log", "Bus STOPPING", 20, "states.STOPPING"),
        ("stop", "states.STOPPING"),
        ("log", "Bus STOPPED", 20, "states.STOPPED"),
        ("log", "Bus EXITING", 20, "states.EXITING"),
        ("exit", "states.EXITING"),
        ("log", "Bus EXITED", 20, "states.EXITING"),
        ("final", "states.EXITING"),
    ]


def test_states_reprs_and_names(impl):
    states = impl.states
    bus = impl.Bus()
    assert bus.states is states
    assert repr(bus.state) == "states.STOPPED"
    for name in ("STOPPED", "STARTING", "STARTED", "STOPPING", "EXITING"):
        state = getattr(states, name)
        assert repr(state) == f"states.{name}"
        assert str(state) == f"states.{name}"
        assert state.name == name
        assert getattr(bus.states, name) is state
    assert states.STARTED != states.STOPPED


def test_default_channels_and_listeners_keys(impl):
    bus = impl.Bus()
    assert set(bus.listeners) == {"start", "stop", "exit", "graceful", "log", "main"}
    assert all(bus.listeners[ch] == set() for ch in bus.listeners)

    def listener():
        return None

    bus.subscribe("custom", listener)
    assert "custom" in bus.listeners
    assert listener in bus.listeners["custom"]
    bus.unsubscribe("custom", listener)
    # The channel stays known, with nobody listening.
    assert bus.listeners["custom"] == set()
    assert bus.publish("custom") == []


def test_listeners_are_live_and_a_channel_declared_with_a_set_works():
    # CherryPy's own code declares channels by putting an empty set in
    # ``listeners`` (cherrypy/__init__.py, ThreadManager); busd keeps a live
    # read-only view of each channel's listeners there instead of a set.
    def scenario(api):
        bus = api.Bus()
        bus.listeners["before_request"] = set()
        bus.listeners.setdefault("start_thread", set())
        seen = []

        def first():
            return "first"

        def second():
            return "second"

        bus.subscribe("before_request", second, priority=60)
        view = bus.listeners["before_request"]
        bus.subscribe("before_request", first)
        seen.append((first in view, second in view, len(view)))
        seen.append(bus.publish("before_request"))
        bus.unsubscribe("before_request", second)
        seen.append((second in view, len(view), view == {first}))
        seen.append(bus.listeners.setdefault("start_thread", set()) == set())
        seen.append(sorted(bus.listeners))
        return seen

    assert run_both(scenario) == [
        (True, True, 2),
        ["first", "second"],
        (False, 1, True),
        True,
        [
            "before_request",
            "exit",
            "graceful",
            "log",
            "main",
            "start",
            "start_thread",
            "stop",
        ],
    ]


# -- publish: order, results, arguments ---------------------------------------


def test_publish_results_in_priority_order():
    def scenario(api):
        bus = api.Bus()

        def by_attribute(*args, **kwargs):
            return ("attr", args, kwargs)

        by_attribute.priority = 5

        def moved(*args, **kwargs):
            return ("moved", args, kwargs)

        bus.subscribe("custom", lambda *a, **k: ("p30", a, k), priority=30)
        bus.subscribe("custom", lambda *a, **k: ("p10", a, k), priority=10)
        bus.subscribe("custom", lambda *a, **k: ("p50", a, k))
        bus.subscribe("custom", by_attribute)
        first = bus.publish("custom")
        bus.subscribe("custom", moved, priority=1)
        bus.subscribe("custom", moved, priority=40)  # again: only moves it
        bus.subscribe("custom", by_attribute, priority=20)  # argument wins
        return first, bus.publish("custom", 1, "two", key="k")

    first, second = run_both(scenario)
    assert first == [
        ("attr", (), {}),
        ("p10", (), {}),
        ("p30", (), {}),
        ("p50", (), {}),
    ]
    assert [name for name, _, _ in second] == ["p10", "attr", "p30", "moved", "p50"]
    assert {(args, tuple(kw.items())) for _, args, kw in second} == {
        ((1, "two"), (("key", "k"),))
    }


def test_priority_argument_overrides_attribute_and_resubscribe_moves(impl):
    bus = impl.Bus()

    def by_attribute():
        return "attr"

    by_attribute.priority = 5

    def moved():
        return "moved"

    bus.subscribe("custom", lambda: "p30", priority=30)
    bus.subscribe("custom", lambda: "p10", priority=10)
    bus.subscribe("custom", by_attribute)
    bus.subscribe("custom", lambda: "p50")
    assert bus.publish("custom") == ["attr", "p10", "p30", "p50"]
    bus.subscribe("custom", moved, priority=1)
    bus.subscribe("custom", moved, priority=40)
    bus.subscribe("custom", by_attribute, priority=20)
    assert bus.publish("custom") == ["p10", "attr", "p30", "moved", "p50"]
    assert len(bus.listeners["custom"]) == 5


def test_publish_passes_arguments_and_unknown_channel_gives_empty_list(impl):
    bus = impl.Bus()
    bus.subscribe("custom", lambda *a, **k: (a, k))
    assert bus.publish("custom", 1, "two", key=3) == [((1, "two"), {"key": 3})]
    assert bus.publish("nobody-listens", 1, key=2) == []
    assert bus.publish(None) == []
    assert "nobody-listens" not in bus.listeners


def test_publish_works_on_a_snapshot_of_the_listeners(impl):
    bus = impl.Bus()
    calls = []

    def late():
        calls.append("late")

    def added():
        calls.append("added")

    def first():
        calls.append("first")
        bus.unsubscribe("custom", late)
        bus.subscribe("custom", added, priority=15)

    bus.subscribe("custom", first, priority=10)
    bus.subscribe("custom", late, priority=20)
    bus.publish("custom")
    bus.publish("custom")
    assert calls == ["first", "late", "first", "added"]


# -- failures ----------------------------------------------------------------


def test_channel_failures_contents_str_and_error_log_lines():
    def scenario(api):
        bus = api.Bus()
        log = record_log(bus)
        ran = []

        def fail_one():
            raise ValueError("one")

        def fail_two():
            raise KeyError("two")

        bus.subscribe("custom", lambda: ran.append("p10") or "ok", priority=10)
        bus.subscribe("custom", fail_one, priority=20)
        bus.subscribe("custom", lambda: ran.append("p30"), priority=30)
        bus.subscribe("custom", fail_two, priority=40)
        with pytest.raises(api.ChannelFailures) as info:
            bus.publish("custom")
        failures = info.value
        instances = failures.get_instances()
        instances.append("not stored")  # get_instances returns a copy
        raw = [(msg, level) for msg, level in log]
        for msg, _ in raw:
            assert "Traceback (most recent call last):" in msg
        return {
            "ran": ran,
            "types": [type(e) for e in failures.get_instances()],
            "str": str(failures),
            "repr": repr(failures),
            "bool": bool(failures),
            "log": [(normalize(msg), level) for msg, level in raw],
        }

    result = run_both(scenario)
    assert result["ran"] == ["p10", "p30"]
    assert result["types"] == [ValueError, KeyError]
    assert result["str"] == result["repr"] == "ValueError('one')\nKeyError('two')"
    assert result["bool"] is True
    assert result["log"] == [
        ("Error in 'custom' listener <function "
         "test_channel_failures_contents_str_and_error_log_lines.<locals>"
         ".scenario.<locals>.fail_one> | ValueError: one", 40),
        ("Error in 'custom' listener <function "
         "test_channel_failures_contents_str_and_error_log_lines.<locals>"
         ".scenario.<locals>.fail_two> | KeyError: 'two'", 40),
    ]  # fmt: skip


def test_error_in_main_listener_logged_at_40_with_traceback(impl):
    bus = impl.Bus()
    log = record_log(bus)

    def broken_tick():
        raise RuntimeError("tick failed")

    bus.subscribe("main", broken_tick)
    with pytest.raises(impl.ChannelFailures):
        bus.publish("main")
    [(msg, level)] = log
    assert level == 40
    assert msg.startswith(f"Error in 'main' listener {broken_tick!r}\nTraceback")
    assert msg.rstrip().endswith("RuntimeError: tick failed")
    assert "in broken_tick" in msg


def test_empty_channel_failures(impl):
    failures = impl.ChannelFailures()
    assert not failures
    assert str(failures) == ""
    assert failures.get_instances() == []
    assert impl.ChannelFailures.delimiter == "\n"


def test_failing_log_listener_is_not_logged_again(impl):
    bus = impl.Bus()
    good = record_log(bus)

    def bad_log(msg, level):
        raise OSError("disk full")

    bus.subscribe("log", bad_log, priority=1)
    with pytest.raises(impl.ChannelFailures) as info:
        bus.log("hello")
    assert str(info.value) == "OSError('disk full')"
    assert good == [("hello", 20)]


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_interrupts_pass_through_and_stop_the_publish(impl, interrupt):
    bus = impl.Bus()
    ran = []

    def stop_everything():
        raise interrupt

    bus.subscribe("main", lambda: ran.append("before"), priority=1)
    bus.subscribe("main", stop_everything, priority=2)
    bus.subscribe("main", lambda: ran.append("after"), priority=3)
    with pytest.raises(interrupt):
        bus.publish("main")
    assert ran == ["before"]


@pytest.mark.parametrize(
    ("earlier_failure", "code", "expected"),
    [
        (True, 0, 1),  # a clean exit after failures must not report success
        (False, 0, 0),
        (True, 3, 3),
        (True, None, None),
        (True, "bye", "bye"),
    ],
)
def test_system_exit_code_rule(impl, earlier_failure, code, expected):
    bus = impl.Bus()
    log = record_log(bus)

    def fail():
        raise ValueError("first")

    def leave():
        raise SystemExit(code)

    if earlier_failure:
        bus.subscribe("main", fail, priority=1)
    bus.subscribe("main", leave, priority=2)
    with pytest.raises(SystemExit) as info:
        bus.publish("main")
    assert info.value.code == expected
    assert len(log) == int(earlier_failure)


# -- subscribe / unsubscribe ----------------------------------------------------


def test_subscribe_as_decorator(impl):
    bus = impl.Bus()

    @bus.subscribe("main")
    def tick():
        return "tick"

    @bus.subscribe("main", priority=10)
    def early():
        return "early"

    def by_attribute():
        return "attr"

    by_attribute.priority = 1
    bus.subscribe("main")(by_attribute)
    assert bus.publish("main") == ["attr", "early", "tick"]


def test_subscribe_returns_the_callback_in_busd_none_in_cherrypy(impl):
    # Documented improvement: busd's subscribe returns the callback, so the
    # decorator leaves the name bound to the function.
    bus = impl.Bus()

    def listener():
        return "x"

    returned = bus.subscribe("main", listener)

    @bus.subscribe("main", priority=1)
    def decorated():
        return "y"

    if impl.name == "busd":
        assert returned is listener
        assert decorated() == "y"
    else:
        assert returned is None
        assert decorated is None
    assert bus.publish("main") == ["y", "x"]


def test_unsubscribe(impl):
    bus = impl.Bus()

    class Plugin:
        def main(self):
            return "plugin"

    plugin = Plugin()
    bus.subscribe("main", plugin.main)
    bus.subscribe("main", lambda: "other", priority=60)
    assert bus.publish("main") == ["plugin", "other"]
    # A fresh bound method compares equal to the subscribed one.
    bus.unsubscribe("main", plugin.main)
    assert bus.publish("main") == ["other"]
    bus.unsubscribe("main", plugin.main)  # not subscribed any more: no error
    bus.unsubscribe("no-such-channel", plugin.main)
    assert bus.publish("main") == ["other"]
    bus.subscribe("main", plugin.main)  # and back, at its old default priority
    assert bus.publish("main") == ["plugin", "other"]


class Recorder:
    """SimplePlugin-style code: methods named after channels, subscribed by
    iterating ``bus.listeners``."""

    def __init__(self, bus: Any, trace: list[Any]) -> None:
        self.bus = bus
        self.trace = trace

    def subscribe(self) -> None:
        for channel in self.bus.listeners:
            method = getattr(self, channel, None)
            if method is not None:
                self.bus.subscribe(channel, method)

    def unsubscribe(self) -> None:
        for channel in self.bus.listeners:
            method = getattr(self, channel, None)
            if method is not None:
                self.bus.unsubscribe(channel, method)

    def start(self) -> None:
        self.trace.append(("recorder.start", repr(self.bus.state)))

    start.priority = 75  # type: ignore[attr-defined]  # as CherryPy plugins do

    def stop(self) -> None:
        self.trace.append(("recorder.stop", repr(self.bus.state)))

    def graceful(self) -> None:
        self.trace.append(("recorder.graceful", repr(self.bus.state)))

    def exit(self) -> None:
        self.trace.append(("recorder.exit", repr(self.bus.state)))


class CherryPyPlugin(SimplePlugin):
    """CherryPy's own SimplePlugin base class, on whichever bus."""

    def __init__(self, bus: Any, trace: list[Any]) -> None:
        super().__init__(bus)
        self.trace = trace

    def start(self) -> None:
        self.trace.append(("simpleplugin.start", repr(self.bus.state)))

    start.priority = 10  # type: ignore[attr-defined]

    def stop(self) -> None:
        self.trace.append(("simpleplugin.stop", repr(self.bus.state)))

    def log(self, msg: str, level: int) -> None:
        self.trace.append(("simpleplugin.log", msg))


def test_simpleplugin_style_code_works_on_both():
    def scenario(api):
        bus = api.Bus()
        trace = []
        recorder = Recorder(bus, trace)
        plugin = CherryPyPlugin(bus, trace)
        recorder.subscribe()
        plugin.subscribe()
        bus.subscribe("start", lambda: trace.append(("plain.start", "p50")))
        bus.start()
        bus.graceful()
        recorder.unsubscribe()
        plugin.unsubscribe()
        bus.exit()  # nobody of the two plugins hears this
        return trace

    assert run_both(scenario) == [
        ("simpleplugin.log", "Bus STARTING"),
        ("simpleplugin.start", "states.STARTING"),
        ("plain.start", "p50"),
        ("recorder.start", "states.STARTING"),
        ("simpleplugin.log", "Bus STARTED"),
        ("simpleplugin.log", "Bus graceful"),
        ("recorder.graceful", "states.STARTED"),
    ]


# -- wait, start_with_callback ------------------------------------------------


def test_wait_with_a_list_of_states(impl):
    states = impl.states
    bus = impl.Bus()
    ticks = []
    ticked_three_times = threading.Event()

    def tick():
        ticks.append(1)
        if len(ticks) == 3:
            ticked_three_times.set()

    bus.subscribe("custom", tick)

    def start_after_three_ticks():
        if ticked_three_times.wait(DEADLINE):
            bus.start()

    starter = threading.Thread(target=start_after_three_ticks)
    starter.start()
    try:
        bus.wait([states.STARTED, states.EXITING], interval=0.01, channel="custom")
        assert bus.state in (states.STARTED, states.EXITING)
        assert len(ticks) >= 3
    finally:
        starter.join(DEADLINE)
    ticks.clear()
    # Already there: return at once, without publishing.
    bus.wait((states.STOPPED, states.STARTED), interval=0.01, channel="custom")
    bus.wait(states.STARTED, interval=0.01, channel="custom")
    assert ticks == []
    bus.exit()


def test_start_with_callback(impl):
    bus = impl.Bus()
    seen = []

    def callback(*args, **kwargs):
        seen.append((args, kwargs, repr(bus.state), threading.current_thread()))

    thread = bus.start_with_callback(callback, args=(1, 2), kwargs={"key": "k"})
    thread.join(DEADLINE)
    assert not thread.is_alive()
    assert thread.name.startswith("Bus Callback Thread-")
    [(args, kwargs, state, ran_in)] = seen
    assert (args, kwargs, state, ran_in) == (
        (1, 2),
        {"key": "k"},
        "states.STARTED",
        thread,
    )
    bus.exit()

    bus = impl.Bus()
    seen.clear()
    thread = bus.start_with_callback(callback)  # no args or kwargs at all
    thread.join(DEADLINE)
    assert [(a, k) for a, k, _, _ in seen] == [((), {})]
    bus.exit()


# -- thread safety (documented busd improvement) --------------------------------


class PausingListener:
    """A listener that, once armed, pauses inside ``__hash__``.

    CherryPy's publish hashes each listener while it walks the live set to
    sort it; pausing there lets another thread subscribe at exactly that
    moment, with no luck involved.
    """

    def __init__(self) -> None:
        self.armed = False
        self.reached = threading.Event()
        self.resume = threading.Event()

    def __hash__(self) -> int:
        if self.armed:
            self.armed = False
            self.reached.set()
            self.resume.wait(DEADLINE)
        return object.__hash__(self)

    def __call__(self) -> str:
        return "pausing"


def test_cherrypy_publish_breaks_when_another_thread_subscribes():
    bus = cherrypy_wspbus.Bus()
    listener = PausingListener()
    bus.subscribe("custom", listener)
    listener.armed = True

    def subscribe_meanwhile():
        if listener.reached.wait(DEADLINE):
            bus.subscribe("custom", lambda: "new")
        listener.resume.set()

    other = threading.Thread(target=subscribe_meanwhile)
    other.start()
    try:
        with pytest.raises(RuntimeError, match="Set changed size during iteration"):
            bus.publish("custom")
    finally:
        listener.resume.set()
        other.join(DEADLINE)


def test_busd_publish_is_unaffected_by_a_subscribe_in_the_middle():
    bus = busd_bus.Bus()
    in_listener = threading.Event()
    subscribed = threading.Event()

    def first():
        in_listener.set()
        subscribed.wait(DEADLINE)
        return "first"

    def subscribe_meanwhile():
        if in_listener.wait(DEADLINE):
            bus.subscribe("custom", lambda: "new", priority=15)
            bus.unsubscribe("custom", last)
        subscribed.set()

    def last():
        return "last"

    bus.subscribe("custom", first, priority=10)
    bus.subscribe("custom", last, priority=20)
    other = threading.Thread(target=subscribe_meanwhile)
    other.start()
    try:
        assert bus.publish("custom") == ["first", "last"]
    finally:
        subscribed.set()
        other.join(DEADLINE)
    assert subscribed.is_set()
    assert bus.publish("custom") == ["first", "new"]


def test_busd_publish_never_raises_while_others_subscribe_and_unsubscribe():
    bus = busd_bus.Bus()
    for i in range(20):
        bus.subscribe("custom", lambda i=i: i, priority=i)
    errors: list[BaseException] = []
    publishes = [0]
    done = threading.Event()

    def publish_in_a_loop():
        while not done.is_set():
            try:
                result = bus.publish("custom")
            except BaseException as error:  # anything at all is a failure
                errors.append(error)
                return
            publishes[0] += 1
            # The 20 fixed listeners always run, in order, whatever changes.
            fixed = [r for r in result if r is not None]
            if fixed != list(range(20)):
                errors.append(AssertionError(f"bad result {result}"))
                return

    def churn(seed: int):
        mine = [lambda: None for _ in range(5)]
        for round_ in range(300):
            for callback in mine:
                bus.subscribe("custom", callback, priority=(seed + round_) % 25)
            for callback in mine:
                bus.unsubscribe("custom", callback)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often to provoke races
    publisher = threading.Thread(target=publish_in_a_loop)
    churners = [threading.Thread(target=churn, args=(seed,)) for seed in range(2)]
    try:
        publisher.start()
        for thread in churners:
            thread.start()
        for thread in churners:
            thread.join(DEADLINE * 3)
    finally:
        done.set()
        publisher.join(DEADLINE)
        sys.setswitchinterval(old_interval)
    assert not any(thread.is_alive() for thread in [publisher, *churners])
    assert errors == []
    assert publishes[0] > 0
    assert bus.publish("custom") == list(range(20))


def test_busd_subscribe_while_a_publish_sorts_is_not_lost():
    # subscribe() takes no lock; the first publish after it sorts the
    # channel. A subscribe that lands while that sort runs must not be
    # overwritten by the sort's stale result. A priority whose comparison
    # pauses holds the sort at exactly that point.
    bus = busd_bus.Bus()
    reached = threading.Event()
    resume = threading.Event()
    armed = [False]

    class PausingPriority(int):
        def __lt__(self, other: object) -> bool:
            if armed[0]:
                armed[0] = False
                reached.set()
                resume.wait(DEADLINE)
            return int(self) < int(other)  # type: ignore[call-overload]

    def a() -> str:
        return "a"

    bus.subscribe("custom", a, priority=PausingPriority(10))
    bus.subscribe("custom", lambda: "b", priority=PausingPriority(20))
    armed[0] = True
    results: list[list[Any]] = []
    publisher = threading.Thread(target=lambda: results.append(bus.publish("custom")))
    publisher.start()
    try:
        assert reached.wait(DEADLINE)
        bus.subscribe("custom", lambda: "new", priority=30)  # mid-sort
        bus.unsubscribe("custom", a)
    finally:
        resume.set()
        publisher.join(DEADLINE)
    assert not publisher.is_alive()
    # The publish in progress had not called anyone yet: it may run with or
    # without the change; every publish after it runs with it.
    assert results[0] in (["a", "b"], ["b", "new"])
    assert bus.publish("custom") == ["b", "new"]


def test_busd_concurrent_subscribe_unsubscribe_keep_one_consistent_record():
    # Several threads subscribe, re-subscribe (new priority) and unsubscribe
    # the same callbacks while another publishes. Afterwards dispatch and
    # ``bus.listeners`` agree, with no duplicate and no ghost.
    bus = busd_bus.Bus()
    shared = [(lambda i=i: i) for i in range(8)]
    errors: list[BaseException] = []
    done = threading.Event()

    def publish_in_a_loop() -> None:
        while not done.is_set():
            try:
                result = bus.publish("custom")
            except BaseException as error:  # anything at all is a failure
                errors.append(error)
                return
            if len(result) != len(set(result)):
                errors.append(AssertionError(f"a listener ran twice: {result}"))
                return

    def churn(seed: int) -> None:
        for round_ in range(300):
            for index, callback in enumerate(shared):
                step = (seed + round_ + index) % 3
                if step == 2:
                    bus.unsubscribe("custom", callback)
                else:
                    bus.subscribe("custom", callback, priority=(seed * round_) % 7)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often to provoke races
    publisher = threading.Thread(target=publish_in_a_loop)
    churners = [threading.Thread(target=churn, args=(seed,)) for seed in range(3)]
    try:
        publisher.start()
        for thread in churners:
            thread.start()
        for thread in churners:
            thread.join(DEADLINE * 3)
    finally:
        done.set()
        publisher.join(DEADLINE)
        sys.setswitchinterval(old_interval)
    assert not any(thread.is_alive() for thread in [publisher, *churners])
    assert errors == []
    listed = {callback() for callback in bus.listeners["custom"]}
    ran = bus.publish("custom")
    assert len(ran) == len(set(ran)) == len(bus.listeners["custom"])
    assert set(ran) == listed


def test_busd_wait_wakes_on_the_state_change_not_the_next_tick():
    bus = busd_bus.Bus()
    starter = threading.Thread(target=bus.start)
    began = time.monotonic()
    starter.start()
    try:
        bus.wait(bus.states.STARTED, interval=60)  # CherryPy would sleep 60 s
    finally:
        starter.join(DEADLINE)
    # A sanity bound (it takes milliseconds): well before the 60 s tick.
    assert time.monotonic() - began < DEADLINE
    bus.exit()


# -- whole processes ---------------------------------------------------------------

CHILD = r'''
"""One bus scenario in its own process; every event is a JSON line."""
import json
import os
import sys
import threading

impl, scenario = sys.argv[1], sys.argv[2]
if impl == "busd":
    from busd.bus import Bus
else:
    from cherrypy.process.wspbus import Bus


def emit(*item):
    # One write(2) per line, which a pipe keeps whole: print() writes the
    # text and the newline apart, and under load a line that CherryPy's
    # block() logs on the main thread lands between the two writes of one
    # that the restarter thread emits (both lines are lost to the parser).
    os.write(1, (json.dumps(item) + "\n").encode())


def event(text):
    return lambda *args: emit("event", text)


class TracedBus(Bus):
    """Code written for CherryPy traces or filters a bus by overriding
    publish(): every transition must go through it."""

    def publish(self, channel, *args, **kwargs):
        emit("publish", channel)
        return super().publish(channel, *args, **kwargs)


bus = TracedBus() if scenario.startswith("traced") else Bus()
bus.subscribe("log", lambda msg, level: emit("log", level, msg))


def fail(message):
    def failing():
        raise ValueError(message)

    return failing


if scenario == "start_fails":
    bus.subscribe("start", fail("start failed"), priority=10)
    bus.subscribe("start", event("later start listener ran"), priority=20)
    bus.subscribe("stop", event("stop listener ran"))
    bus.subscribe("exit", event("exit listener ran"))
    bus.start()
    emit("event", "start returned")

elif scenario == "traced":
    bus.subscribe("start", event("start listener ran"))
    bus.subscribe("graceful", event("graceful listener ran"))

    def tick():
        # The first main tick of block() runs the rest of the life.
        bus.graceful()
        bus.stop()
        bus.start()
        bus.exit()

    bus.subscribe("main", tick)
    bus.start()
    bus.wait(bus.states.STARTED)  # already there: publishes nothing
    bus.block(interval=0.02)
    emit("event", "block returned")

elif scenario == "traced_start_fails":
    bus.subscribe("start", fail("start failed"))
    bus.subscribe("stop", event("stop listener ran"))
    bus.subscribe("exit", event("exit listener ran"))
    bus.start()
    emit("event", "start returned")

elif scenario in ("exit_fails", "stop_fails"):
    channel = scenario.split("_")[0]
    bus.subscribe(channel, fail(channel + " failed"), priority=10)
    bus.subscribe("stop", event("stop listener ran"), priority=20)
    bus.subscribe("exit", event("exit listener ran"), priority=20)
    bus.start()
    bus.exit()
    emit("event", "exit returned")

elif scenario == "sigint":
    # The worker ends once block() has named it, so that the line
    # "Waiting for thread worker." is there in both implementations.
    named = threading.Event()
    worker = threading.Thread(target=named.wait, name="worker")

    def on_log(msg, level):
        if msg == "Waiting for thread worker.":
            named.set()

    bus.subscribe("log", on_log)
    ticks = []

    def tick():
        ticks.append(1)
        if len(ticks) == 1:
            emit("event", "STARTED")  # printed from inside block()

    bus.subscribe("main", tick)
    bus.subscribe("stop", event("stop listener ran"))
    bus.subscribe("exit", event("exit listener ran"))
    bus.start()
    worker.start()
    bus.block(interval=0.02)
    emit("event", "block returned")

elif scenario == "restart":
    if os.environ.get("BUS_TEST_RUN") == "2":
        emit("event", "second run", sys.argv, os.getcwd())
        sys.exit(0)
    os.environ["BUS_TEST_RUN"] = "2"
    emit("event", "first run", sys.argv, os.getcwd())
    os.chdir("/")  # restart goes back to the directory the process began in
    bus.subscribe("exit", event("exit listener ran"))
    bus.start()
    threading.Thread(target=bus.restart, name="restarter").start()
    bus.block(interval=0.02)
    emit("event", "block returned")

elif scenario == "daemon_exit":
    def slow_exit():
        threading.Event().wait(0.5)  # stands for slow clean-up work
        emit("event", "exit listener finished")

    bus.subscribe("exit", slow_exit)
    bus.start()
    threading.Thread(target=bus.exit, daemon=True).start()
    bus.block(interval=0.02)
    emit("event", "block returned")

elif scenario == "linger":
    never = threading.Event()
    bus.subscribe("exit", event("exit listener ran"))
    bus.start()
    threading.Thread(target=never.wait, name="lingerer").start()
    bus.exit()
    if impl == "busd":
        bus.block(interval=0.02, thread_timeout=0.5)
    else:
        bus.block(interval=0.02)
    emit("event", "block returned")
'''


class Child:
    """A child process whose stdout is read line by line with deadlines."""

    def __init__(self, script: str, impl: str, scenario: str, *extra: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "BUS_TEST_RUN"}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, script, impl, scenario, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=os.path.dirname(script),
            preexec_fn=default_sigint,  # the Ctrl-C scenario needs it
        )
        self.pid = self.proc.pid
        self.raw: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _next(self, deadline: float) -> str | None:
        line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        if line is not None:
            self.raw.append(line)
        return line

    def expect(self, wanted: list[Any], timeout: float = DEADLINE) -> None:
        """Read until a JSON line equal to ``wanted``; fail at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._next(deadline)
            except queue.Empty:
                pytest.fail(f"no {wanted!r} in time; got:\n{''.join(self.raw)}")
            if line is None:
                pytest.fail(f"no {wanted!r} before EOF; got:\n{''.join(self.raw)}")
            if parse(line) == wanted:
                return

    def finish(self, timeout: float = DEADLINE) -> tuple[int, list[Any]]:
        """Wait for the end of the process; return its status and events."""
        deadline = time.monotonic() + timeout
        try:
            while self._next(deadline) is not None:
                pass
            returncode = self.proc.wait(max(0.0, deadline - time.monotonic()))
        except (queue.Empty, subprocess.TimeoutExpired):
            pytest.fail(f"child did not end in time; got:\n{''.join(self.raw)}")
        events = [parse(line) for line in self.raw]
        return returncode, [e for e in events if e is not None]

    def kill(self) -> None:
        """End the process by its PID if it still runs, and reap it."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(DEADLINE)
        self._reader.join(DEADLINE)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def parse(line: str) -> list[Any] | None:
    try:
        item = json.loads(line)
    except ValueError:
        return None  # e.g. a warning on stderr
    if item[0] == "log":
        return ["log", item[1], normalize(item[2])]
    return item


@pytest.fixture(scope="module")
def child_script(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("bus_child") / "child.py"
    path.write_text(CHILD)
    return str(path)


@contextmanager
def children(script: str, scenario: str, *extra: str) -> Iterator[dict[str, Child]]:
    """Start the scenario under both implementations at once; kill leftovers."""
    started = {name: Child(script, name, scenario, *extra) for name in IMPLEMENTATIONS}
    try:
        yield started
    finally:
        for child in started.values():
            child.kill()


def run_children(script: str, scenario: str) -> dict[str, tuple[int, list[Any]]]:
    with children(script, scenario) as started:
        return {name: child.finish() for name, child in started.items()}


def log(level: int, msg: str) -> list[Any]:
    return ["log", level, msg]


def test_process_start_listener_fails_exit_status_70(child_script):
    results = run_children(child_script, "start_fails")
    # Documented difference: busd runs no start listener after a failed one
    # (a daemon must not bind its socket or report READY after its PID file
    # was refused); CherryPy runs them all, then shuts down.
    later = ["event", "later start listener ran"]
    cherrypy_code, cherrypy_events = results["cherrypy"]
    assert later in cherrypy_events
    cherrypy_events.remove(later)
    returncode, events = results["busd"]
    assert (returncode, events) == (cherrypy_code, cherrypy_events)
    assert returncode == 70
    assert events == [
        log(20, "Bus STARTING"),
        log(40, "Error in 'start' listener <function fail.<locals>.failing>"
                " | ValueError: start failed"),
        log(40, "Shutting down due to error in start listener:"
                " | ChannelFailures: ValueError('start failed')"),
        log(20, "Bus STOPPING"),
        ["event", "stop listener ran"],
        log(20, "Bus STOPPED"),
        log(20, "Bus EXITING"),
        ["event", "exit listener ran"],
        log(20, "Bus EXITED"),
    ]  # fmt: skip


def published(channel: str | None) -> list[Any]:
    return ["publish", channel]


def test_process_publish_override_sees_every_transition(child_script):
    # A subclass overriding publish() (to trace or filter) sees each channel
    # the bus publishes on: start as well as stop, graceful, exit, log, main.
    results = run_children(child_script, "traced")
    assert results["busd"] == results["cherrypy"]
    returncode, events = results["busd"]
    assert returncode == 0
    started = [
        published("log"), log(20, "Bus STARTING"),
        published("start"), ["event", "start listener ran"],
        published("log"), log(20, "Bus STARTED"),
    ]  # fmt: skip
    stopped = [
        published("log"), log(20, "Bus STOPPING"),
        published("stop"),
        published("log"), log(20, "Bus STOPPED"),
    ]  # fmt: skip
    assert events == [
        *started,
        published("main"),
        published("log"), log(20, "Bus graceful"),
        published("graceful"), ["event", "graceful listener ran"],
        *stopped,
        *started,
        *stopped,
        published("log"), log(20, "Bus EXITING"),
        published("exit"),
        published("log"), log(20, "Bus EXITED"),
        published("log"), log(20, "Waiting for child threads to terminate..."),
        ["event", "block returned"],
    ]  # fmt: skip


def test_process_publish_override_sees_a_failed_start(child_script):
    # The error path of start(): the failing start listener, the log lines
    # about it, then the whole exit, all through publish().
    results = run_children(child_script, "traced_start_fails")
    assert results["busd"] == results["cherrypy"]
    returncode, events = results["busd"]
    assert returncode == 70
    assert events == [
        published("log"), log(20, "Bus STARTING"),
        published("start"),
        published("log"),
        log(40, "Error in 'start' listener <function fail.<locals>.failing>"
                " | ValueError: start failed"),
        published("log"),
        log(40, "Shutting down due to error in start listener:"
                " | ChannelFailures: ValueError('start failed')"),
        published("log"), log(20, "Bus STOPPING"),
        published("stop"), ["event", "stop listener ran"],
        published("log"), log(20, "Bus STOPPED"),
        published("log"), log(20, "Bus EXITING"),
        published("exit"), ["event", "exit listener ran"],
        published("log"), log(20, "Bus EXITED"),
    ]  # fmt: skip


EXIT_FAILURE_LINE = log(40, "Bus exit failed: ending the process with status 70")


def test_process_exit_listener_fails_others_still_run_status_70(child_script):
    results = run_children(child_script, "exit_fails")
    expected = [
        log(20, "Bus STARTING"),
        log(20, "Bus STARTED"),
        log(20, "Bus STOPPING"),
        ["event", "stop listener ran"],
        log(20, "Bus STOPPED"),
        log(20, "Bus EXITING"),
        log(40, "Error in 'exit' listener <function fail.<locals>.failing>"
                " | ValueError: exit failed"),
        ["event", "exit listener ran"],
    ]  # fmt: skip
    assert results["cherrypy"] == (70, expected)
    # busd adds one line saying why the process ends (documented).
    assert results["busd"] == (70, [*expected, EXIT_FAILURE_LINE])


def test_process_stop_listener_fails_busd_still_runs_exit_listeners(child_script):
    # Documented improvement: CherryPy ends the process as soon as a stop
    # listener fails, so the exit listeners (the PID file, ...) never run.
    results = run_children(child_script, "stop_fails")
    common = [
        log(20, "Bus STARTING"),
        log(20, "Bus STARTED"),
        log(20, "Bus STOPPING"),
        log(40, "Error in 'stop' listener <function fail.<locals>.failing>"
                " | ValueError: stop failed"),
        ["event", "stop listener ran"],
    ]  # fmt: skip
    assert results["cherrypy"] == (70, common)
    assert results["busd"] == (
        70,
        [
            *common,
            log(20, "Bus EXITING"),
            ["event", "exit listener ran"],
            EXIT_FAILURE_LINE,
        ],
    )


def test_process_block_ctrl_c_shuts_down_and_exits_0(child_script):
    with children(child_script, "sigint") as started:
        for child in started.values():
            child.expect(["event", "STARTED"])
            os.kill(child.pid, signal.SIGINT)
        results = {name: child.finish() for name, child in started.items()}
    assert results["busd"] == results["cherrypy"]
    returncode, events = results["busd"]
    assert returncode == 0
    assert events[events.index(["event", "STARTED"]) + 1 :] == [
        log(20, "Keyboard Interrupt: shutting down bus"),
        log(20, "Bus STOPPING"),
        ["event", "stop listener ran"],
        log(20, "Bus STOPPED"),
        log(20, "Bus EXITING"),
        ["event", "exit listener ran"],
        log(20, "Bus EXITED"),
        log(20, "Waiting for child threads to terminate..."),
        log(20, "Waiting for thread worker."),
        ["event", "block returned"],
    ]


def test_process_restart_reexecutes_with_the_same_argv(child_script):
    with children(child_script, "restart", "--extra", "arg two") as started:
        results = {name: child.finish() for name, child in started.items()}

    waiting = log(20, "Waiting for child threads to terminate...")
    here = os.path.dirname(child_script)

    def argv(impl):
        return [child_script, impl, "restart", "--extra", "arg two"]

    def respawning(impl):
        return log(20, f"Re-spawning {' '.join([sys.executable, *argv(impl)])}")

    def neutral(name, event):
        # Only the implementation's own argument becomes IMPL: the paths
        # around it (checkout, venv, temporary directory) may hold its name.
        if event[0] == "event" and len(event) == 4 and event[2] == argv(name):
            return [event[0], event[1], argv("IMPL"), event[3]]
        if event == respawning(name):
            return respawning("IMPL")
        return event

    def comparable(name):
        returncode, events = results[name]
        return returncode, [
            neutral(name, e)
            for e in events
            # Races in CherryPy: whether the restarter thread is still alive
            # when block() looks, and whether block() polls before or after
            # that thread logged "Bus EXITED".
            if e != waiting
            and not (e[0] == "log" and e[2] == "Waiting for thread restarter.")
        ]

    assert comparable("busd") == comparable("cherrypy")
    assert results["cherrypy"][1].count(waiting) == 1
    returncode, events = results["busd"]
    assert returncode == 0
    events = [e for e in events if e != log(20, "Waiting for thread restarter.")]
    assert events == [
        ["event", "first run", argv("busd"), here],
        log(20, "Bus STARTING"),
        log(20, "Bus STARTED"),
        log(20, "Bus STOPPING"),
        log(20, "Bus STOPPED"),
        log(20, "Bus EXITING"),
        ["event", "exit listener ran"],
        log(20, "Bus EXITED"),
        waiting,
        respawning("busd"),
        ["event", "second run", argv("busd"), here],
    ]


def test_process_block_waits_for_an_exit_called_from_a_daemon_thread(child_script):
    # busd's wait() wakes at once on EXITING; block() must still let the
    # exit listeners finish before the main thread ends the process. CherryPy
    # only gives them until its next poll (interval=0.02 here).
    results = run_children(child_script, "daemon_exit")
    returncode, events = results["busd"]
    assert returncode == 0
    assert events[-5:] == [
        log(20, "Bus EXITING"),
        ["event", "exit listener finished"],
        log(20, "Bus EXITED"),
        log(20, "Waiting for child threads to terminate..."),
        ["event", "block returned"],
    ]
    returncode, events = results["cherrypy"]
    assert returncode == 0
    assert ["event", "block returned"] in events
    assert ["event", "exit listener finished"] not in events


def test_process_block_thread_timeout_busd_ends_cherrypy_hangs(child_script):
    # Documented improvement: block(thread_timeout=...) gives up on a
    # non-daemon thread that never ends; CherryPy waits for it forever.
    with children(child_script, "linger") as started:
        for child in started.values():
            child.expect(log(20, "Waiting for thread lingerer."))
        returncode, events = started["busd"].finish()
        cherrypy = started["cherrypy"]
        with pytest.raises(subprocess.TimeoutExpired):
            cherrypy.proc.wait(1.0)  # still stuck well past busd's 0.5 s
    assert cherrypy.proc.returncode == -signal.SIGKILL  # ended by kill()
    assert returncode == 70
    assert events[-4:] == [
        log(20, "Bus EXITED"),
        log(20, "Waiting for child threads to terminate..."),
        log(20, "Waiting for thread lingerer."),
        log(40, "Threads still running after 0.5 s: lingerer; "
                "ending the process with status 70"),
    ]  # fmt: skip


# -- documented differences, each shown on both sides ----------------------------


def test_second_exit_is_a_no_op_in_busd():
    # busd: a second SIGTERM during a slow exit must not run the stop and exit
    # listeners again. CherryPy runs them again.
    def scenario(api):
        bus = api.Bus()
        log = record_log(bus)
        bus.start()
        bus.exit()
        del log[:]
        bus.exit()
        return log

    assert scenario(IMPLEMENTATIONS["cherrypy"]) == [
        ("Bus STOPPING", 20),
        ("Bus STOPPED", 20),
        ("Bus EXITING", 20),
        ("Bus EXITED", 20),
    ]
    assert scenario(IMPLEMENTATIONS["busd"]) == []


def test_exit_failure_says_why_the_process_ends(child_script):
    results = run_children(child_script, "exit_fails")
    busd_code, busd_events = results["busd"]
    assert results["cherrypy"] == (busd_code, busd_events[:-1])
    assert busd_events[-1] == EXIT_FAILURE_LINE


def test_failure_logging_bus_started_exits_the_bus():
    def scenario(api):
        bus = api.Bus()

        def log_fails_on_started(msg, level):
            if msg == "Bus STARTED":
                raise OSError("log failed")

        bus.subscribe("log", log_fails_on_started)
        with pytest.raises(api.ChannelFailures):
            bus.start()
        state = repr(bus.state)
        if bus.state is not api.states.EXITING:
            bus.exit()
        return state

    assert run_both(scenario) == "states.EXITING"


def test_start_with_callback_thread_name_suffix():
    def scenario(api):
        bus = api.Bus()
        thread = bus.start_with_callback(lambda: None)
        thread.join(DEADLINE)
        bus.exit()
        return re.sub(r"Thread-\d+", "Thread-N", thread.name)

    assert run_both(scenario) == "Bus Callback Thread-N (_callback)"
