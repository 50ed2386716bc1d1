"""What a broker and its instances are given when they are made.

Supervision objects never reach up to their owner for anything: what they
need from the rest of busd (how to start a worker process, where a settled
message goes, who hears a state change) comes in one :class:`PoolServices`,
built by whoever owns them. A test builds one with fakes and drives a
``Broker`` or an ``Instance`` in-process, without a daemon.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NamedTuple, Protocol

from busd.config import BrokerConfig
from busd.supervision.delivery import Delivery, Outcome
from busd.supervision.states import InstanceState


class InstanceView(Protocol):
    """An instance as those it reports to see it (``Instance`` is one)."""

    index: int
    config: BrokerConfig
    state: InstanceState
    pid: int | None

    @property
    def name(self) -> str:
        """``broker:index``."""


class StdinPipe(Protocol):
    """The writing end of a worker's stdin (an asyncio write transport)."""

    def write(self, data: bytes) -> None:
        """Queue ``data`` for the worker."""

    def close(self) -> None:
        """Close the pipe: the worker reads EOF."""


class ProcessHandle(Protocol):
    """A started worker process, as an instance sees it.

    ``busd.spawner.WorkerProcess`` is the real one; tests pass a fake.
    """

    @property
    def pid(self) -> int:
        """Its process id."""

    @property
    def returncode(self) -> int | None:
        """Its exit status once it exited (-N: killed by signal N)."""

    @property
    def stdin(self) -> StdinPipe | None:
        """Its stdin, once connected."""

    @property
    def stderr(self) -> asyncio.StreamReader | None:
        """Its stderr, once connected."""

    async def connect(self, stdout: asyncio.Protocol, stderr_limit: int) -> None:
        """Start reading stdout with ``stdout`` and stderr as lines."""

    async def wait(self) -> int | None:
        """The exit status once it exited (None: unknown)."""

    def send_signal(self, signum: int) -> None:
        """Signal the process, unless it exited already."""


class Sink(Protocol):
    """Something with frames queued for one write."""

    def write_queued(self) -> None:
        """Write what is queued, in one write."""


class Writes(Protocol):
    """Where queued writes are gathered (``busd.outbox.Outbox``)."""

    def add(self, sink: Sink, answer: bool = False) -> None:
        """``sink`` has something to write."""

    def hold(self) -> Any:
        """A context manager: writes queued inside go out at its end."""


#: Start a worker process for (broker config, instance index).
Launch = Callable[[BrokerConfig, int], Awaitable[ProcessHandle]]
#: A broker is done with a delivery: (broker, delivery, outcome, last error).
Settle = Callable[[str, Delivery, Outcome, str], None]


class RestartTiming(NamedTuple):
    """busd's own part of the restart backoff; tests make it shorter.

    The rest is each broker's: ``backoff_max`` (the cap), ``backoff_reset``
    (how long a worker must run to start a new series of failures) and
    ``start_retries`` (how many failed starts in a row before FATAL).
    """

    #: The delay before the first restart of a series; it doubles from here
    #: at each failed start in a row, up to the broker's ``backoff_max``.
    backoff_first: float = 0.1


class PoolServices(NamedTuple):
    """Everything a Broker and its Instances need from the rest of busd."""

    #: Starts a worker process (raises OSError or ValueError if it cannot).
    launch: Launch
    #: Gathers the writes to workers of one read or loop turn.
    outbox: Writes
    #: Encodes one frame for a worker.
    encode: Callable[[dict[str, Any]], bytes]
    #: Runs a coroutine as a task on the I/O loop, keeping it referenced.
    background: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]]
    #: Where a broker reports a settled delivery (the router).
    settle: Settle
    #: A worker published ``message`` on ``channel``: (origin, channel, message).
    publish: Callable[[str, str, Any], None]
    #: An instance changed state: (instance, old state, reason).
    state_changed: Callable[[InstanceView, InstanceState, str], None]
    #: A line a worker wrote on stderr: (instance, pid, line).
    log_line: Callable[[InstanceView, int, str], None]
    #: Waits until each instance is RUNNING or has failed (``states.SETTLED``).
    wait_settled: Callable[[list[InstanceView]], Awaitable[None]]
    timing: RestartTiming = RestartTiming()
