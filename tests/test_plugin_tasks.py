"""BackgroundTask, PerpetualTimer and Monitor with real threads: repetition,
cancel, errors. Side by side with CherryPy's: tests/test_tasks_vs_cherrypy.py.
"""

import logging
import threading
import time

import pytest
from helpers import record_log

from busd import Bus
from busd.plugins.tasks import (
    MONITOR_START_PRIORITY,
    BackgroundTask,
    Monitor,
    PerpetualTimer,
)

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


class ThreadErrors(list):
    """The (thread name, exception type) of each exception that ended a thread."""

    def __init__(self):
        super().__init__()
        self._changed = threading.Condition()

    def hook(self, args):
        """A threading.excepthook."""
        with self._changed:
            self.append((args.thread.name, args.exc_type))
            self._changed.notify_all()

    def wait_for(self, n):
        with self._changed:
            assert self._changed.wait_for(lambda: len(self) >= n, DEADLINE)


@pytest.fixture
def thread_errors(monkeypatch):
    """What threading.excepthook receives during the test."""
    errors = ThreadErrors()
    monkeypatch.setattr(threading, "excepthook", errors.hook)
    return errors


@pytest.mark.parametrize("make", ["task", "timer"])
def test_failing_function_is_logged_once_and_ends_the_thread(make, thread_errors):
    # CherryPy's behaviour, the default: log at 40 with traceback, re-raise.
    bus = Bus()
    log = record_log(bus)
    counter = Counter(fail=True)
    if make == "task":
        task = BackgroundTask(FAST, counter, bus=bus, name="flaky")
        what = "background task"
    else:
        task = PerpetualTimer(FAST, counter, bus=bus)
        task.name = "flaky"
        what = "perpetual timer"
    task.start()
    task.join(DEADLINE)
    assert not task.is_alive()
    assert counter.calls == 1
    assert thread_errors == [("flaky", ValueError)]
    [(msg, level)] = log
    assert level == logging.ERROR
    assert msg.startswith(f"Error in {what} thread function {counter!r}.\n")
    assert "Traceback (most recent call last)" in msg
    assert msg.rstrip().endswith("ValueError: failure number 1")
    if make == "task":
        assert not task.running


@pytest.mark.parametrize("make", ["task", "timer"])
def test_keep_running_logs_each_failure_and_goes_on(make):
    bus = Bus()
    log = record_log(bus)
    counter = Counter(fail=True)
    if make == "task":
        task = BackgroundTask(FAST, counter, bus=bus, keep_running=True)
    else:
        task = PerpetualTimer(FAST, counter, bus=bus, keep_running=True)
    task.start()
    counter.wait_for(3)
    task.cancel()
    task.join(DEADLINE)
    assert not task.is_alive()
    errors = [msg for msg, level in log if level == logging.ERROR]
    assert len(errors) >= 2  # the task survived its first failure
    for msg in errors:
        assert repr(counter) in msg  # names the function
        assert "Traceback (most recent call last)" in msg
        assert "ValueError: failure number" in msg


def test_keep_running_without_bus_goes_to_the_logger(caplog):
    counter = Counter(fail=True)
    task = BackgroundTask(FAST, counter, keep_running=True)
    with caplog.at_level(logging.ERROR, logger="busd.plugins.tasks"):
        task.start()
        counter.wait_for(2)
        task.cancel()
        task.join(DEADLINE)
    assert any(
        repr(counter) in r.getMessage() and r.exc_info is not None
        for r in caplog.records
    )


def test_perpetual_timer_repeats_until_cancelled():
    counter = Counter()
    timer = PerpetualTimer(FAST, counter, args=[], kwargs={})
    assert isinstance(timer, threading.Timer)
    assert timer.bus is None and not timer.daemon
    timer.start()
    counter.wait_for(3)
    timer.cancel()
    timer.join(DEADLINE)
    assert not timer.is_alive()


def test_task_keeps_args_and_kwargs_as_given():
    args, kwargs = [1, 2], {"k": 3}
    task = BackgroundTask(1, print, args, kwargs)
    assert task.args is args and task.kwargs is kwargs
    assert BackgroundTask(1, print).kwargs == {}


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


def test_failing_callback_ends_the_thread_until_graceful(thread_errors):
    bus = Bus()
    log = record_log(bus)
    counter = Counter(fail=True)
    monitor = Monitor(bus, counter, frequency=FAST, name="failing")
    monitor.subscribe()
    bus.start()
    thread_errors.wait_for(1)
    first = monitor.thread
    first.join(DEADLINE)
    assert counter.calls == 1
    bus.graceful()  # a new thread: the callback is called again
    thread_errors.wait_for(2)
    assert counter.calls == 2
    bus.exit()
    failures = [msg for msg, level in log if level == logging.ERROR]
    assert len(failures) == 2
    assert thread_errors == [("failing", ValueError)] * 2


def test_keep_running_callback_keeps_being_called_and_logged():
    bus = Bus()
    log = record_log(bus)
    counter = Counter(fail=True)
    monitor = Monitor(bus, counter, frequency=FAST, name="failing", keep_running=True)
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
        if level == logging.ERROR and "background task thread function" in msg
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
