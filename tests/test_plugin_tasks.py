"""BackgroundTask and Monitor with real threads: repetition, cancel, errors."""

import logging
import threading
import time

import pytest
from helpers import record_log

from busd import Bus
from busd.plugins.tasks import MONITOR_START_PRIORITY, BackgroundTask, Monitor

FAST = 0.01  # seconds between calls in these tests
DEADLINE = 10.0  # generous: a loaded 2-core machine may stall a thread


class Counter:
    """A callback that counts its calls and lets a test wait for N of them."""

    def __init__(self, fail=False):
        self.calls = 0
        self.fail = fail
        self._changed = threading.Condition()

    def __call__(self):
        with self._changed:
            self.calls += 1
            self._changed.notify_all()
        if self.fail:
            raise ValueError(f"failure number {self.calls}")

    def wait_for(self, n):
        with self._changed:
            assert self._changed.wait_for(lambda: self.calls >= n, DEADLINE), (
                f"only {self.calls} calls, wanted {n}"
            )
            return self.calls


def test_background_task_repeats_with_args_until_cancelled():
    seen = []
    counter = Counter()

    def work(a, b=None):
        seen.append((a, b))
        counter()

    task = BackgroundTask(FAST, work, args=(1,), kwargs={"b": 2})
    assert task.daemon
    task.start()
    counter.wait_for(3)
    task.cancel()
    task.join(DEADLINE)
    assert not task.is_alive()
    assert not task.running
    assert seen[0] == (1, 2)
    calls = counter.calls
    assert counter.calls == calls  # a joined thread makes no more calls


def test_cancel_ends_a_long_wait_at_once():
    task = BackgroundTask(3600, lambda: None)
    task.start()
    started = time.monotonic()
    task.cancel()
    task.join(DEADLINE)
    assert not task.is_alive()
    # A sanity bound (it takes milliseconds): not after the hour-long interval.
    assert time.monotonic() - started < 5


def test_cancel_before_start_means_no_call():
    counter = Counter()
    task = BackgroundTask(0.001, counter)
    task.cancel()
    task.start()
    task.join(DEADLINE)
    assert not task.is_alive()
    assert counter.calls == 0


def test_failing_function_is_logged_each_time_and_keeps_running():
    bus = Bus()
    log = record_log(bus)
    counter = Counter(fail=True)
    task = BackgroundTask(FAST, counter, bus=bus, name="flaky")
    task.start()
    counter.wait_for(3)
    task.cancel()
    task.join(DEADLINE)
    errors = [msg for msg, level in log if level == logging.ERROR]
    assert len(errors) >= 2  # the task survived its first failure
    for msg in errors:
        assert "'flaky'" in msg
        assert repr(counter) in msg  # names the function
        assert "Traceback (most recent call last)" in msg
        assert "ValueError: failure number" in msg


def test_failing_function_without_bus_goes_to_the_logger(caplog):
    counter = Counter(fail=True)
    task = BackgroundTask(FAST, counter, name="lonely")
    with caplog.at_level(logging.ERROR, logger="busd.plugins.tasks"):
        task.start()
        counter.wait_for(2)
        task.cancel()
        task.join(DEADLINE)
    assert any(
        "lonely" in r.getMessage() and r.exc_info is not None for r in caplog.records
    )


def test_monitor_runs_from_start_until_stop():
    bus = Bus()
    log = record_log(bus)
    counter = Counter()
    monitor = Monitor(bus, counter, frequency=FAST, name="tick")
    monitor.subscribe()
    assert monitor.callback is counter
    assert monitor.frequency == FAST
    assert monitor.thread is None

    bus.start()
    thread = monitor.thread
    assert thread is not None and thread.name == "tick" and thread.daemon
    counter.wait_for(5)

    bus.stop()
    assert monitor.thread is None
    assert not thread.is_alive()  # stop joined it
    after_stop = counter.calls
    assert counter.calls == after_stop
    messages = [msg for msg, _ in log]
    assert "Started monitor thread 'tick'." in messages
    assert "Stopped thread 'tick'." in messages
    bus.exit()


def test_monitor_start_priority_follows_cherrypy():
    bus = Bus()
    order = []
    monitor = Monitor(bus, lambda: None, frequency=3600)
    monitor.subscribe()
    bus.subscribe("start", lambda: order.append(monitor.thread), priority=60)
    bus.subscribe("start", lambda: order.append(monitor.thread), priority=80)
    bus.start()
    try:
        assert MONITOR_START_PRIORITY == 70
        assert order[0] is None and order[1] is monitor.thread
    finally:
        bus.exit()


def test_monitor_graceful_restarts_the_thread():
    bus = Bus()
    counter = Counter()
    monitor = Monitor(bus, counter, frequency=FAST)
    monitor.subscribe()
    bus.start()
    first = monitor.thread
    counter.wait_for(2)

    bus.graceful()
    second = monitor.thread
    assert second is not first and not first.is_alive()
    assert second.is_alive() and second.name == "Monitor"
    calls = counter.calls
    counter.wait_for(calls + 3)  # the new thread calls the callback
    bus.exit()
    assert not second.is_alive()


def test_monitor_start_twice_keeps_one_thread():
    bus = Bus()
    log = record_log(bus)
    monitor = Monitor(bus, lambda: None, frequency=3600, name="once")
    monitor.start()
    thread = monitor.thread
    monitor.start()
    assert monitor.thread is thread
    assert "Monitor thread 'once' already started." in [m for m, _ in log]
    monitor.stop()
    monitor.stop()  # nothing left to stop: logged, no error
    assert "No thread running for once." in [m for m, _ in log]
    assert not thread.is_alive()


def test_monitor_with_zero_frequency_is_disabled():
    bus = Bus()
    monitor = Monitor(bus, lambda: None, frequency=0)
    monitor.start()
    assert monitor.thread is None


def test_failing_callback_keeps_being_called_and_logged_with_traceback():
    bus = Bus()
    log = record_log(bus)
    counter = Counter(fail=True)
    monitor = Monitor(bus, counter, frequency=FAST, name="failing")
    monitor.subscribe()
    bus.start()
    counter.wait_for(4)
    thread = monitor.thread
    assert thread.is_alive()
    bus.exit()
    assert not thread.is_alive()
    failures = [
        msg
        for msg, level in log
        if level == logging.ERROR and "background task 'failing'" in msg
    ]
    assert len(failures) >= 3
    assert all("Traceback" in msg and "ValueError" in msg for msg in failures)


def test_callback_may_stop_its_own_monitor():
    bus = Bus()
    stopped = threading.Event()
    monitor = None

    def stop_myself():
        monitor.stop()  # from the monitor's thread: cancel, must not join
        stopped.set()

    monitor = Monitor(bus, stop_myself, frequency=FAST)
    monitor.start()
    thread = monitor.thread
    assert stopped.wait(DEADLINE)
    thread.join(DEADLINE)
    assert not thread.is_alive()
    assert monitor.thread is None


@pytest.mark.parametrize("method", ["stop", "graceful"])
def test_stop_waits_for_a_call_in_progress(method):
    bus = Bus()
    inside = threading.Event()
    release = threading.Event()
    finished = []

    def slow():
        inside.set()
        release.wait(DEADLINE)
        finished.append(True)

    monitor = Monitor(bus, slow, frequency=FAST)
    monitor.start()
    assert inside.wait(DEADLINE)
    timer = threading.Timer(0.05, release.set)
    timer.start()
    getattr(monitor, method)()  # returns only once the call has finished
    assert finished
    timer.join()
    monitor.stop()
