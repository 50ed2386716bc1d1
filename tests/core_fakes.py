"""Fakes for in-process tests of Router, Broker and Instance (no daemon).

A :class:`Harness` builds ``PoolServices`` around a :class:`FakeLauncher`,
whose :class:`FakeProcess` workers are driven by the test: it feeds their
frames to busd (``ready``, ``ack``, ``nack``, ``publish``), makes them exit,
and decodes what busd wrote to their stdin. Everything runs on the event
loop of one ``asyncio.run``; nothing sleeps: the tests wait for conditions
with a deadline (:func:`wait_until`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from typing import Any, TypeVar

from busd.config import BrokerConfig
from busd.outbox import Outbox
from busd.protocol import FrameDecoder, FrameEncoder, encode_frame
from busd.supervision.broker import Broker
from busd.supervision.delivery import Delivery, Outcome
from busd.supervision.instance import Instance
from busd.supervision.services import InstanceView, PoolServices, RestartTiming
from busd.supervision.states import SETTLED, InstanceState

T = TypeVar("T")
S = InstanceState

#: No scenario may take longer than this (each takes milliseconds).
DEADLINE = 3.0

#: Restarts come at once (with ``broker_config``'s ``backoff_max``), so
#: that a series of failed starts is over in milliseconds.
FAST = RestartTiming(backoff_first=0.001)


def broker_config(name: str = "b", **changes: Any) -> BrokerConfig:
    """A handler broker named ``name``; ``changes`` as dataclasses.replace.

    Its backoff is capped at 10 ms (``backoff_max``) unless ``changes`` say
    otherwise: a long series of failed starts stays quick.
    """
    base = dataclasses.replace(
        BrokerConfig(name), handler="tests:Worker", stop_timeout=1.0, backoff_max=0.01
    )
    return dataclasses.replace(base, **changes)


async def wait_until(
    condition: Callable[[], object], what: str = "", timeout: float = 2.0
) -> None:
    """Give the loop turns until ``condition()`` is true; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0)


# -- a worker process -------------------------------------------------------------


class FakeStdin:
    """The writing end of a worker's stdin: records the bytes busd writes."""

    def __init__(self, on_close: Callable[[], None]) -> None:
        self.data = bytearray()
        #: Bytes written after close() (a real pipe drops them).
        self.late = bytearray()
        self.closed = False
        self.writes = 0
        self._on_close = on_close

    def write(self, data: bytes) -> None:
        self.writes += 1
        (self.late if self.closed else self.data).extend(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._on_close()

    def frames(self) -> list[dict[str, Any]]:
        """Every frame busd wrote, decoded, in order."""
        frames = FrameDecoder(1 << 30).feed(bytes(self.data))
        assert all(isinstance(f, dict) for f in frames), frames
        return frames  # type: ignore[return-value]


class FakeProcess:
    """A worker process as an ``Instance`` sees it (``ProcessHandle``).

    With ``auto_exit`` it exits with status 0 once busd closes its stdin
    (after the ``stop`` frame), as a real worker does; with ``ignore`` it
    ignores those signals (SIGKILL cannot be ignored). SIGTERM and SIGKILL
    make it exit with ``-signum``.
    """

    def __init__(
        self, pid: int, broker: str, index: int, auto_exit: bool, ignore: Iterable[int]
    ) -> None:
        self.pid = pid
        self.broker = broker
        self.index = index
        self.returncode: int | None = None
        self.stdin: FakeStdin | None = FakeStdin(self._stdin_closed)
        self.stderr: asyncio.StreamReader | None = asyncio.StreamReader()
        self.protocol: asyncio.Protocol | None = None
        self.stderr_limit: int | None = None
        self.signals: list[int] = []
        self.auto_exit = auto_exit
        self.ignore = set(ignore)
        #: What wait() returns: the status, or None (unknown: not busd's child).
        self._exit: asyncio.Future[int | None] = (
            asyncio.get_running_loop().create_future()
        )

    def __repr__(self) -> str:
        return f"FakeProcess({self.broker}:{self.index}, pid={self.pid})"

    # -- ProcessHandle --------------------------------------------------------

    async def connect(self, stdout: asyncio.Protocol, stderr_limit: int) -> None:
        self.protocol = stdout
        self.stderr_limit = stderr_limit

    async def wait(self) -> int | None:
        return await asyncio.shield(self._exit)

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)
        if self.returncode is not None or self._exit.done():
            return
        if signum == signal.SIGKILL or (
            signum == signal.SIGTERM and signum not in self.ignore
        ):
            self.exit(-signum)

    # -- what the test makes it do --------------------------------------------

    def say(self, *frames: dict[str, Any]) -> None:
        """Write ``frames`` on stdout, in one read of busd's."""
        assert self.protocol is not None, "not connected"
        self.protocol.data_received(b"".join(encode_frame(f) for f in frames))

    def ready(self) -> None:
        self.say({"type": "ready"})

    def ack(self, *ids: int) -> None:
        """One ack frame per id."""
        self.say(*({"type": "ack", "id": i} for i in ids))

    def ack_many(self, ids: list[Any]) -> None:
        """One ack frame for all of ``ids``."""
        self.say({"type": "ack", "ids": ids})

    def nack(self, delivery_id: int, error: str = "boom") -> None:
        self.say({"type": "nack", "id": delivery_id, "error": error})

    def publish(self, channel: Any, message: Any) -> None:
        self.say({"type": "publish", "channel": channel, "message": message})

    def exit(self, status: int | None = 0, close_stdout: bool = True) -> None:
        """The process exits: its pipes close, then busd hears its status.

        With ``close_stdout=False`` the status comes first and its stdout
        is read to its end later (``close_stdout()``), as can happen.
        """
        if self._exit.done():
            return
        self.returncode = status
        assert self.stderr is not None
        self.stderr.feed_eof()
        if close_stdout:
            self.close_stdout()
        self._exit.set_result(status)

    def close_stdout(self) -> None:
        if self.protocol is not None:
            self.protocol.connection_lost(None)

    def _stdin_closed(self) -> None:
        if self.auto_exit:
            asyncio.get_running_loop().call_soon(self.exit, 0)

    # -- what busd wrote ------------------------------------------------------

    def frames(self) -> list[dict[str, Any]]:
        assert self.stdin is not None
        return self.stdin.frames()

    def deliveries(self) -> list[dict[str, Any]]:
        """The ``deliver`` frames busd wrote, in order."""
        return [f for f in self.frames() if f.get("type") == "deliver"]

    def delivered_ids(self) -> list[int]:
        return [f["id"] for f in self.deliveries()]

    @property
    def stop_requested(self) -> bool:
        return any(f.get("type") == "stop" for f in self.frames())

    @property
    def exited(self) -> bool:
        return self._exit.done()


class FakeLauncher:
    """``PoolServices.launch``: hands out FakeProcesses, records every call.

    ``fail_next(error)`` makes the next launches raise; ``gate()`` makes the
    next launch wait for the returned future (which may also carry an
    exception) before it goes on.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.processes: list[FakeProcess] = []
        self.auto_exit = True
        self.ignore: set[int] = set()
        self._failures: list[BaseException] = []
        self._gates: list[asyncio.Future[None]] = []
        self._pids = iter(range(1000, 100000))

    def fail_next(self, *errors: BaseException) -> None:
        self._failures.extend(errors)

    def gate(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._gates.append(future)
        return future

    async def __call__(self, config: BrokerConfig, index: int) -> FakeProcess:
        self.calls.append((config.name, index))
        if self._gates:
            await self._gates.pop(0)
        if self._failures:
            raise self._failures.pop(0)
        process = FakeProcess(
            next(self._pids), config.name, index, self.auto_exit, self.ignore
        )
        self.processes.append(process)
        return process

    def of(self, broker: str, index: int) -> list[FakeProcess]:
        """The processes launched for instance ``broker:index``, oldest first."""
        return [p for p in self.processes if (p.broker, p.index) == (broker, index)]

    def current(self, broker: str, index: int) -> FakeProcess:
        processes = self.of(broker, index)
        assert processes, f"no process launched for {broker}:{index}"
        return processes[-1]


# -- the services ---------------------------------------------------------------


class Harness:
    """``PoolServices`` with fakes, recording what brokers and instances report.

    ``settle`` and ``publish`` default to recorders (``settled``,
    ``published``); pass a router's to wire brokers through it. Every
    exception of a background task or loop callback is kept in ``errors``:
    :func:`run` fails the test with it.
    """

    def __init__(
        self,
        timing: RestartTiming = FAST,
        settle: Callable[[str, Delivery, Outcome, str], None] | None = None,
        publish: Callable[[str, str, Any], None] | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_error)
        self.launcher = FakeLauncher()
        self.outbox = Outbox(loop)
        #: (broker, delivery id, outcome, error) for each settle, in order.
        self.settled: list[tuple[str, int, Outcome, str]] = []
        #: (origin, channel, message) of each worker's publish.
        self.published: list[tuple[str, str, Any]] = []
        #: (instance name, old state, new state, reason) of each change.
        self.transitions: list[tuple[str, S, S, str]] = []
        self.log_lines: list[tuple[str, int, str]] = []
        self.errors: list[BaseException] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._settle = settle
        self._publish = publish
        self.services = PoolServices(
            launch=self.launcher,
            outbox=self.outbox,
            encode=FrameEncoder(),
            background=self.background,
            settle=self.settle,
            publish=self.publish,
            state_changed=self.state_changed,
            log_line=self.log_line,
            wait_settled=self.wait_settled,
            timing=timing,
        )

    # -- the services' callables ----------------------------------------------

    def background(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.errors.append(task.exception())  # type: ignore[arg-type]

    def _loop_error(
        self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]
    ) -> None:
        self.errors.append(
            context.get("exception") or RuntimeError(context.get("message"))
        )

    def settle(self, broker: str, delivery: Delivery, outcome: Outcome, error: str):
        self.settled.append((broker, delivery.id, outcome, error))
        if self._settle is not None:
            self._settle(broker, delivery, outcome, error)
        else:
            delivery.settle(outcome)

    def publish(self, origin: str, channel: str, message: Any) -> None:
        self.published.append((origin, channel, message))
        if self._publish is not None:
            self._publish(origin, channel, message)

    def state_changed(self, instance: InstanceView, old: S, reason: str) -> None:
        self.transitions.append((instance.name, old, instance.state, reason))

    def log_line(self, instance: InstanceView, pid: int, line: str) -> None:
        self.log_lines.append((instance.name, pid, line))

    async def wait_settled(self, instances: list[InstanceView]) -> None:
        await wait_until(
            lambda: all(i.state in SETTLED for i in instances),
            what="instances to settle",
        )

    def use_router(self, router: Any) -> None:
        """Settle and publish through ``router`` (as the daemon wires it)."""
        self._settle = router.settle
        self._publish = router.publish_from_worker

    # -- helpers for the tests ------------------------------------------------

    def states(self, name: str) -> list[S]:
        """The states instance ``name`` went through, its first one included."""
        moves = [(old, new) for n, old, new, _ in self.transitions if n == name]
        return [moves[0][0], *(new for _, new in moves)] if moves else []

    def reasons(self, name: str, state: S) -> list[str]:
        return [r for n, _, new, r in self.transitions if n == name and new is state]

    def settled_ids(self, outcome: Outcome = "acked") -> list[int]:
        return [i for _, i, o, _ in self.settled if o == outcome]

    async def running_broker(self, config: BrokerConfig) -> Broker:
        """A broker whose instances all said ready."""
        broker = Broker(config, self.services)
        await broker.scale(config.instances)
        for index in range(config.instances):
            self.launcher.current(config.name, index).ready()
        assert broker.running() == config.instances
        return broker

    def process(self, instance: Instance) -> FakeProcess:
        """The fake process of ``instance`` now."""
        return self.launcher.current(instance.config.name, instance.index)


class FakePool:
    """What an Instance reports to (its broker), recorded."""

    def __init__(self) -> None:
        self.acks: list[list[int]] = []
        self.nacks: list[tuple[int, str]] = []
        #: (ids, the instance's state when they were handed back).
        self.requeues: list[tuple[list[int], S]] = []
        self.dispatches = 0

    def acked(self, deliveries: list[Delivery]) -> None:
        self.acks.append([d.id for d in deliveries])

    def nacked(self, instance: Instance, delivery: Delivery, error: str) -> None:
        self.nacks.append((delivery.id, error))

    def requeue(self, instance: Instance, deliveries: list[Delivery]) -> None:
        self.requeues.append(([d.id for d in deliveries], instance.state))

    def dispatch(self) -> None:
        self.dispatches += 1


async def turns(count: int = 5) -> None:
    """Let the loop run ``count`` turns (what is ready runs; no time passes)."""
    for _ in range(count):
        await asyncio.sleep(0)


async def after_timers(delay: float) -> None:
    """Return once every timer due within ``delay`` from now has run, and
    the tasks it started had a turn (timers run in deadline order)."""
    loop = asyncio.get_running_loop()
    probe: asyncio.Future[None] = loop.create_future()
    loop.call_later(delay, probe.set_result, None)
    await probe
    await turns(3)


def run(scenario: Callable[[Harness], Awaitable[T]], **harness: Any) -> T:
    """Run ``scenario(harness)`` on a new loop, with a deadline; fail on any
    exception a background task or loop callback raised meanwhile."""

    async def main() -> T:
        h = Harness(**harness)
        result = await asyncio.wait_for(scenario(h), DEADLINE)
        await asyncio.sleep(0)
        if h.errors:
            raise AssertionError(f"errors in the background: {h.errors!r}") from (
                h.errors[0]
            )
        return result

    return asyncio.run(main())


# -- the operator's log -------------------------------------------------------------


class LogLines(logging.Handler):
    """(level, line) of each record, rendered when it is logged (as busd's
    own handlers do: an argument such as an instance may change later)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelname, record.getMessage()))


@contextlib.contextmanager
def busd_log(level: int = logging.INFO) -> Iterator[LogLines]:
    """Record what busd's loggers log at ``level`` and above meanwhile."""
    logger = logging.getLogger("busd")
    handler = LogLines()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
