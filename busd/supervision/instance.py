"""One broker instance: a worker process, its states, and its pipes.

An instance lives on busd's I/O loop. Its worker is started by the
``launch`` it is given (busd's forks it from the fork server, with pipes on
stdin, stdout and stderr): frames go down stdin, acks and publishes come up
stdout, log lines come on stderr. Its life is the diagram of
``busd.supervision.states``; every transition is made by
:meth:`Instance.change_state`.

The restart policy (``_after_exit``): a start *fails* when the worker
cannot be launched, or exits (whatever its status) before it was RUNNING
for the broker's ``backoff_reset`` seconds. Each failed start in a row
doubles the wait before the next one, from ``RestartTiming.backoff_first``
up to the broker's ``backoff_max``; a worker that ran long enough starts a
new series. busd retries for ever, unless the broker sets
``start_retries``: one more failed start in a row than that gives FATAL,
until ``busctl start`` (``reset``).

An instance is *wanted* (``wanted``) from its start until it is stopped on
purpose (``stop``), or the restart policy leaves it stopped after a clean
exit: health (busd/report.py) asks that every wanted instance be RUNNING.

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

from busd.config import BrokerConfig, Restart
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
        #: Failed starts in a row (see the module docstring).
        self.failures = 0
        self.acked = 0
        self.nacked = 0
        #: How the last process ended ("exit status 1", "killed by SIGKILL").
        self.last_exit: str | None = None
        #: Why the last process ended unexpectedly, and when: "exit status 1
        #: before it was ready", "cannot start: ...".
        self.exit_cause: str | None = None
        #: busd means this instance to run (see the module docstring).
        self.wanted = False
        #: When the pending restart is due (time.monotonic()), in BACKOFF.
        self.retry_at: float | None = None
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
        # Between the stop and the start of restart(): stopped, but wanted
        # and about to start.
        self._restarting = False

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
        self.wanted = True
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
                self._after_exit(self.last_exit, clean=False, ran=None)
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
            background(self._stop())

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
        log.error(
            "%s: exited unexpectedly (%s)%s",
            f"{self.name} (PID {process.pid})",
            self.last_exit,
            " before it was ready" if self.ready_at is None else "",
        )
        self.pid = None
        if self.ready_at is None:
            ran = None
            cause = f"{self.last_exit} before it was ready"
        else:
            ran = time.time() - self.ready_at
            cause = f"{self.last_exit} after {_duration(ran)} running"
        self._after_exit(cause, clean=status == 0 and ran is not None, ran=ran)
        # Only now, out of RUNNING: requeueing dispatches, and this instance
        # must not be handed messages for a process that is gone.
        self._requeue_inflight()

    def _after_exit(self, cause: str, clean: bool, ran: float | None) -> None:
        """Apply the restart policy after an unexpected exit or a failed launch.

        ``cause`` says why the process ended (or never began); ``clean``: it
        exited with status 0 after it was ready; ``ran``: how long it was
        RUNNING (None: it never was).
        """
        self.exit_cause = cause
        config = self.config
        policy = config.restart
        if policy is Restart.NEVER or (policy is Restart.ON_FAILURE and clean):
            # A clean exit is the worker's own choice: it is not missed. A
            # failure under "never" is: health keeps asking for it.
            if clean:
                self.wanted = False
            self.change_state(S.STOPPED, f"restart = {policy}")
            return
        if ran is not None and ran >= config.backoff_reset:
            self.failures = 0  # it ran long enough: not a failed start
        else:
            self.failures += 1
        limit = config.start_retries
        if limit is not None and self.failures > limit:
            log.error(
                "%s: FATAL after %s in a row (start_retries = %d); "
                "`busctl start %s` tries again",
                self.name,
                _failed_starts(self.failures),
                limit,
                self.name,
            )
            self.change_state(S.FATAL, _failed_starts(self.failures))
            return
        delay = backoff_delay(
            self.services.timing.backoff_first, config.backoff_max, self.failures
        )
        self.retry_at = time.monotonic() + delay
        series = f"failed start {self.failures} in a row, " if self.failures else ""
        self.change_state(S.BACKOFF, f"{series}next try in {delay:g} s")
        loop = asyncio.get_running_loop()
        self._backoff = loop.call_later(delay, self._restart_after_backoff)

    def _restart_after_backoff(self) -> None:
        self._backoff = None
        self.retry_at = None
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
        The instance is no longer wanted: it stays stopped.
        """
        self.wanted = False
        await self._stop(timeout)

    async def restart(self) -> None:
        """Stop the worker and start a new one, with a new series of failures.

        The instance stays wanted throughout, and can run (``can_run``)
        even while it is stopped between the two.
        """
        self._restarting = True
        try:
            await self._stop()
        finally:
            self._restarting = False
        self.reset()
        await self.start()

    async def _stop(self, timeout: float | None = None) -> None:
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
        self.retry_at = None
        if self._backoff is not None:
            self._backoff.cancel()
            self._backoff = None

    def reset(self) -> None:
        """Forget past failed starts (``busctl start`` after FATAL)."""
        self.failures = 0

    # -- what health and publish --wait ask -----------------------------------------

    def can_run(self) -> bool:
        """Whether this instance runs, or will without an operator's help.

        True while STARTING, RUNNING, in BACKOFF (a restart is due) and
        during ``restart``; false once FATAL or STOPPED.
        """
        return self._restarting or self.state in _ON_ITS_WAY

    def condition(self) -> str:
        """Its state in a few words, for the health summary and refusals.

        ``FATAL (5 failed starts)``, ``BACKOFF (2 failed starts)``,
        ``STOPPED (exit status 1 before it was ready; restart = never)``.
        """
        state = self.state.name
        if self.state in WAITING and self.failures:
            return f"{state} ({_failed_starts(self.failures)})"
        if self.state is S.STOPPED and self.wanted and self.exit_cause:
            return f"{state} ({self.exit_cause}; restart = {self.config.restart})"
        return state


#: States in which an instance runs or is about to, with nobody's help.
_ON_ITS_WAY = frozenset({S.STARTING, S.RUNNING, S.BACKOFF})


def backoff_delay(first: float, cap: float, failures: int) -> float:
    """The wait before the next start after ``failures`` failed starts in a row.

    ``first`` for the first (and after a long run: ``failures`` 0), then
    doubling, never over ``cap``. The exponent is bounded: a crash loop
    that lasts for days would otherwise overflow a float.
    """
    return min(cap, first * 2.0 ** min(max(failures - 1, 0), 64))


def _failed_starts(count: int) -> str:
    return f"{count} failed start{'' if count == 1 else 's'}"


def _duration(seconds: float) -> str:
    """``0.4 s``, ``42 s``, ``12 min``, ``5 h``: how long a worker ran."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 600:
        return f"{seconds:.0f} s"
    if seconds < 36000:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"
