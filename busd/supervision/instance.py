"""One broker instance: a worker process, its states, and its pipes.

An instance lives on busd's I/O loop. Its worker is started by the
``launch`` it is given (busd's forks it from the fork server, with pipes on
stdin, stdout and stderr): frames go down stdin, acks and publishes come up
stdout, log lines come on stderr. Its life is the diagram of
``busd.supervision.states``; every transition is made by
:meth:`Instance.change_state`.

A failure is *fast* when the worker never reported ready or died within
``fast_failure_seconds`` of it; ``max_fast_failures`` in a row give FATAL.
Between restarts the delay doubles from ``backoff_first`` up to
``backoff_cap`` (``RestartTiming``).

An instance reports to two parties, both given when it is made: its
``pool`` (the broker: acks, nacks, requeues, room for more) and the
``PoolServices`` (state changes, log lines, a worker's publishes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import Any, Protocol

from busd.config import BrokerConfig
from busd.protocol import ProtocolError, encode_frame
from busd.supervision.delivery import Delivery
from busd.supervision.pipes import (
    MAX_LOG_LINE,
    WorkerStdout,
    describe_status,
    read_log_line,
)
from busd.supervision.services import PoolServices, ProcessHandle
from busd.supervision.states import ALIVE, ALLOWED, WAITING, InstanceState

log = logging.getLogger("busd.broker")

S = InstanceState


class Pool(Protocol):
    """What an instance reports its messages to (its broker)."""

    def acked(self, deliveries: list[Delivery]) -> None:
        """The worker acknowledged ``deliveries``."""

    def nacked(self, instance: Instance, delivery: Delivery, error: str) -> None:
        """The worker's listeners failed on ``delivery``."""

    def requeue(self, instance: Instance, deliveries: list[Delivery]) -> None:
        """The worker is gone with ``deliveries`` unacknowledged."""

    def dispatch(self) -> None:
        """An instance has room for more messages."""


class Instance:
    """One worker process of a broker."""

    def __init__(
        self, config: BrokerConfig, index: int, pool: Pool, services: PoolServices
    ) -> None:
        #: The broker's config; its broker sets a new one on reload.
        self.config = config
        self.index = index
        self.pool = pool
        self.services = services
        self.state = InstanceState.STOPPED
        self.process: ProcessHandle | None = None
        self.pid: int | None = None
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.restarts = 0
        self.fast_failures = 0
        self.acked = 0
        self.nacked = 0
        self.last_exit: str | None = None
        self.inflight: dict[int, Delivery] = {}
        # Encoded deliver frames for the outbox's next write (write_queued),
        # and the process they are for.
        self._outgoing: list[bytes] = []
        self._outgoing_to: ProcessHandle | None = None
        self._encode = services.encode
        self._backoff: asyncio.TimerHandle | None = None
        # Set while no worker process is on its way or alive: stop() waits
        # on it, so it is cleared as soon as a start begins, not once the
        # launch is over (a stop during the launch must wait for the exit).
        self._exited: asyncio.Event = asyncio.Event()
        self._exited.set()
        # The worker was killed for an ack timeout and its exit is not seen
        # yet: the same hang is not charged again meanwhile.
        self._killed_for_timeout = False

    @property
    def name(self) -> str:
        """``broker:index``, as in logs and ``busctl``."""
        return f"{self.config.name}:{self.index}"

    def __str__(self) -> str:
        return f"{self.name} (PID {self.pid})" if self.pid else self.name

    # -- the one door for state changes ----------------------------------------

    def change_state(self, new: InstanceState, reason: str = "") -> None:
        """Move to ``new`` if the diagram allows it; announce the change."""
        if new is self.state:
            return
        if new not in ALLOWED[self.state]:
            raise RuntimeError(
                f"{self.name}: no transition {self.state.name} -> {new.name}"
            )
        old, self.state = self.state, new
        self.services.state_changed(self, old, reason)

    # -- starting ----------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker process (STARTING); it is RUNNING once it says so."""
        if self.state in ALIVE:
            return
        self._cancel_backoff()
        self.change_state(S.STARTING)
        self.started_at = time.time()
        self.ready_at = None
        self._killed_for_timeout = False
        self._exited = asyncio.Event()
        try:
            process = await self.services.launch(self.config, self.index)
        except (OSError, ValueError) as error:
            log.error("%s: cannot start: %s", self.name, error)
            self.last_exit = f"cannot start: {error}"
            self._exited.set()
            if self.state is S.STOPPING:  # stop() came during the launch
                self.change_state(S.STOPPED)
            else:
                self._after_exit(fast=True)
            return
        self.process = process
        self.pid = process.pid
        log.info("%s: started, PID %d", self.name, self.pid)
        stdout = WorkerStdout(self.frames_received, self.broken_frame)
        await process.connect(stdout, stderr_limit=MAX_LOG_LINE)
        background = self.services.background
        background(self._read_log(process))
        background(self._wait_exit(process, stdout))
        if self.state is S.STOPPING:
            # stop() came while the worker was being started, and found
            # nothing to ask: ask now, and press on as stop() does.
            self._ask_to_stop()
            background(self.stop())

    # -- what the worker says ----------------------------------------------------

    def frames_received(self, frames: list[dict[str, Any] | ProtocolError]) -> None:
        """Act on the frames of one read of the worker's stdout."""
        # The answers (publish --wait) and new deliveries these acks
        # release leave together, at the end.
        with self.services.outbox.hold():
            for frame in frames:
                if isinstance(frame, ProtocolError):
                    log.error("%s: unreadable frame ignored: %s", self, frame.message)
                else:
                    self._handle(frame)

    def broken_frame(self, error: ProtocolError) -> None:
        """The worker's stdout is no longer a frame stream: kill it."""
        log.error("%s: broken frame, stopping it: %s", self, error.message)
        self._kill(signal.SIGKILL)

    def _handle(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "ack":
            # One ack, or the acks of several messages in one frame ("ids").
            ids = frame.get("ids")
            if ids is None:
                ids = (frame.get("id"),)
            elif not isinstance(ids, list):
                log.warning("%s: ignoring an ack whose 'ids' is not a list", self)
                return
            done = [d for d in map(self._take, ids) if d is not None]
            if done:
                self.acked += len(done)
                self.pool.acked(done)
        elif kind == "nack":
            delivery = self._take(frame.get("id"))
            if delivery is not None:
                self.nacked += 1
                self.pool.nacked(self, delivery, str(frame.get("error", "")))
        elif kind == "publish":
            self._publish(frame)
        elif kind == "ready":
            if self.state is S.STARTING:
                self.ready_at = time.time()
                self.change_state(S.RUNNING)
                self.pool.dispatch()
        else:
            log.warning("%s: ignoring a frame of unknown type %r", self, kind)

    def _publish(self, frame: dict[str, Any]) -> None:
        channel = frame.get("channel")
        if not isinstance(channel, str) or not channel:
            log.warning("%s: publish without a channel name ignored", self)
            return
        self.services.publish(str(self), channel, frame.get("message"))

    def _take(self, delivery_id: Any) -> Delivery | None:
        """Remove and return the in-flight delivery with this id.

        None for an id this instance does not hold (unknown, answered
        already) and for anything that is not an id at all: a broker's
        frame may carry any msgpack value there.
        """
        if type(delivery_id) is not int:
            return None
        return self.inflight.pop(delivery_id, None)

    async def _read_log(self, process: ProcessHandle) -> None:
        assert process.stderr is not None
        pid = process.pid
        while True:
            raw = await read_log_line(process.stderr)
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip("\n")
            self.services.log_line(self, pid, line)

    async def _wait_exit(self, process: ProcessHandle, stdout: WorkerStdout) -> None:
        status = await process.wait()
        # Its last acks first: what it acknowledged is not delivered again.
        await stdout.closed
        self.last_exit = (
            "exit status unknown" if status is None else describe_status(status)
        )
        self.process = None
        self._exited.set()
        if self.state is S.STOPPING:
            log.info(
                "%s: stopped (%s)", f"{self.name} (PID {process.pid})", self.last_exit
            )
            self._requeue_inflight()
            self.pid = None
            self.change_state(S.STOPPED)
            return
        timing = self.services.timing
        ran = time.time() - (self.ready_at or time.time())
        fast = self.ready_at is None or ran < timing.fast_failure_seconds
        log.error(
            "%s: exited unexpectedly (%s)%s",
            f"{self.name} (PID {process.pid})",
            self.last_exit,
            " before it was ready" if self.ready_at is None else "",
        )
        self.pid = None
        self._after_exit(fast=fast, clean=status == 0)
        # Only now, out of RUNNING: requeueing dispatches, and this instance
        # must not be handed messages for a process that is gone.
        self._requeue_inflight()

    def _after_exit(self, fast: bool, clean: bool = False) -> None:
        """Apply the restart policy after an unexpected exit."""
        policy = str(self.config.restart)
        if policy == "never" or (policy == "on-failure" and clean):
            self.change_state(S.STOPPED, f"restart = {policy}")
            return
        timing = self.services.timing
        self.fast_failures = self.fast_failures + 1 if fast else 1
        if self.fast_failures >= timing.max_fast_failures:
            log.error(
                "%s: FATAL after %d fast failures in a row; `busctl start %s` "
                "tries again",
                self.name,
                self.fast_failures,
                self.name,
            )
            self.change_state(S.FATAL, f"{self.fast_failures} fast failures")
            return
        delay = min(
            timing.backoff_cap, timing.backoff_first * 2 ** (self.fast_failures - 1)
        )
        self.change_state(S.BACKOFF, f"restarting in {delay:g} s")
        loop = asyncio.get_running_loop()
        self._backoff = loop.call_later(delay, self._restart_after_backoff)

    def _restart_after_backoff(self) -> None:
        self._backoff = None
        if self.state is S.BACKOFF:
            self.restarts += 1
            self.services.background(self._restart_if_still_waiting())

    async def _restart_if_still_waiting(self) -> None:
        # Checked again in the task: a stop() between the timer and this
        # task must hold.
        if self.state is S.BACKOFF:
            await self.start()

    def _requeue_inflight(self) -> None:
        if self.inflight:
            deliveries = list(self.inflight.values())
            self.inflight.clear()
            log.warning(
                "%s: %d unacknowledged messages go to another instance",
                self.name,
                len(deliveries),
            )
            self.pool.requeue(self, deliveries)

    # -- what busd tells the worker -------------------------------------------

    def deliver(self, delivery: Delivery) -> None:
        """Send ``delivery`` to the worker; it is in flight until acked."""
        assert self.process is not None and self.process.stdin is not None
        delivery.attempts += 1
        delivery.sent_at = time.monotonic()
        self.inflight[delivery.id] = delivery
        frame = self._encode(
            {
                "type": "deliver",
                "id": delivery.id,
                "channel": delivery.channel,
                "message": delivery.message,
                "redelivered": delivery.redelivered,
                "attempt": delivery.attempts,
            }
        )
        # One pipe write per read or loop turn (the outbox), not per message:
        # a dispatch after a batch of acks hands out many messages at once.
        if not self._outgoing:
            self._outgoing_to = self.process
            self.services.outbox.add(self)
        self._outgoing.append(frame)

    def write_queued(self) -> None:
        """Write the queued deliveries to the worker's stdin (for the outbox).

        A process that is gone since they were queued gets nothing: the
        messages are in ``inflight`` and go to another instance when its
        exit is seen.
        """
        frames, self._outgoing = self._outgoing, []
        process = self._outgoing_to
        if process is None or process is not self.process or not frames:
            return
        assert process.stdin is not None
        with contextlib.suppress(ConnectionError, RuntimeError):
            process.stdin.write(b"".join(frames))

    def has_room(self) -> bool:
        """Whether this instance can take one more message now."""
        return self.state is S.RUNNING and len(self.inflight) < self.config.max_inflight

    # -- stopping -----------------------------------------------------------------

    async def stop(self, timeout: float | None = None) -> None:
        """Stop the worker: ask, then SIGTERM, then SIGKILL after ``timeout``.

        The worker is asked first (a ``stop`` frame), so it can finish the
        message in hand; SIGTERM follows half-way through ``timeout``, and
        SIGKILL at its end. Unacknowledged messages go to other instances.
        """
        timeout = self.config.stop_timeout if timeout is None else timeout
        self._cancel_backoff()
        if self.state in WAITING:
            self.change_state(S.STOPPED, "stopped while not running")
            return
        if self.state is S.STOPPED:
            return
        if self.state is not S.STOPPING:
            self.change_state(S.STOPPING)
            self._ask_to_stop()
        for signum, wait in (
            (signal.SIGTERM, timeout / 2),
            (signal.SIGKILL, timeout / 2),
        ):
            try:
                await asyncio.wait_for(self._exited.wait(), wait)
                return
            except TimeoutError:
                log.warning(
                    "%s: still running after the stop request; sending %s",
                    self,
                    signal.Signals(signum).name,
                )
                self._kill(signum)
        await self._exited.wait()

    def _ask_to_stop(self) -> None:
        """Send the worker a ``stop`` frame and close its stdin."""
        process = self.process
        if process is not None and process.stdin is not None:
            self.write_queued()  # what was delivered goes before the stop
            with contextlib.suppress(ConnectionError, RuntimeError):
                process.stdin.write(encode_frame({"type": "stop"}))
                process.stdin.close()

    def check_ack_timeout(self, now: float) -> None:
        """Kill a RUNNING worker that has held a message past ``ack_timeout``.

        Its messages then go to another instance (see ``_wait_exit``).
        """
        timeout = self.config.ack_timeout
        if (
            not timeout
            or self.state is not S.RUNNING
            or not self.inflight
            or self._killed_for_timeout
        ):
            return
        oldest = min(self.inflight.values(), key=lambda d: d.sent_at)
        if now - oldest.sent_at > timeout:
            oldest.timeouts += 1
            oldest.errors.append(f"not acknowledged within {timeout:g} s by {self}")
            log.error(
                "%s: message %d not acknowledged within %g s (ack_timeout); "
                "the worker is taken as hung and killed",
                self,
                oldest.id,
                timeout,
            )
            self._killed_for_timeout = True
            self._kill(signal.SIGKILL)

    def _kill(self, signum: int) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    def _cancel_backoff(self) -> None:
        if self._backoff is not None:
            self._backoff.cancel()
            self._backoff = None

    def reset(self) -> None:
        """Forget past fast failures (``busctl start`` after FATAL)."""
        self.fast_failures = 0
