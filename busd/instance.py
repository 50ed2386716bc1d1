"""One broker instance: a worker process, its states, and its pipes.

An instance lives on busd's I/O loop. Its worker runs busd/worker.py,
forked by the fork server (busd/spawner.py), with pipes on stdin, stdout
and stderr: frames go down stdin, acks and publishes come up stdout, log
lines come on stderr.
Its life, with every transition made by :meth:`Instance.change_state`::

                 start()           "ready" frame
      STOPPED ------------> STARTING ------------> RUNNING
         ^  ^                 |    \\                 |   \\
         |   \\   stop()       |     \\ exit           |    \\ stop()
         |    \\-------- STOPPING <---\\-------------------/   (ask, SIGTERM,
         |                            \\             | exit      SIGKILL)
         |        backoff timer        V             V
         |   BACKOFF <------------- (exited unexpectedly: restart policy)
         |      |   too many fast failures
         |      +---------------------------> FATAL   (busctl start resets)
         +--- restart policy says no, or stop() while in BACKOFF/FATAL

A failure is *fast* when the worker never reported ready or died within
``FAST_FAILURE_SECONDS`` of it; ``MAX_FAST_FAILURES`` in a row give FATAL.
Between restarts the delay doubles from ``BACKOFF_FIRST`` up to
``BACKOFF_CAP``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from busd.protocol import FrameDecoder, ProtocolError, encode_frame
from busd.worker import ORIGINAL_PYTHONPATH

if TYPE_CHECKING:
    from busd.broker import Broker
    from busd.spawner import WorkerProcess

log = logging.getLogger("busd.broker")

FAST_FAILURE_SECONDS = 1.0
MAX_FAST_FAILURES = 5
BACKOFF_FIRST = 0.1
BACKOFF_CAP = 30.0
MAX_LOG_LINE = 8192
WORKER_MAX_FRAME = 64 << 20


class InstanceState(enum.Enum):
    """Where a worker process is in its life (see the module diagram)."""

    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    FATAL = "FATAL"


S = InstanceState
ALLOWED: dict[InstanceState, frozenset[InstanceState]] = {
    S.STOPPED: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.RUNNING, S.STOPPING, S.BACKOFF, S.FATAL, S.STOPPED}),
    S.RUNNING: frozenset({S.STOPPING, S.BACKOFF, S.FATAL, S.STOPPED}),
    S.BACKOFF: frozenset({S.STARTING, S.STOPPED}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.FATAL: frozenset({S.STARTING, S.STOPPED}),
}


class Delivery:
    """One message on its way to one broker.

    A plain class with slots, not a dataclass: one is made for every
    message and broker, and this is the cheapest to build.
    """

    __slots__ = (
        "attempts",
        "channel",
        "errors",
        "id",
        "message",
        "on_settled",
        "redelivered",
        "sent_at",
        "timeouts",
    )

    def __init__(
        self,
        id: int,
        channel: str,
        message: Any,
        on_settled: Callable[[str], None] | None = None,
        redelivered: bool = False,
    ) -> None:
        self.id = id
        self.channel = channel
        self.message = message
        # Called once with "acked" or "dead" (publish --wait listens here).
        self.on_settled = on_settled
        self.redelivered = redelivered
        self.attempts = 0
        self.errors: list[str] = []
        # When it was last handed to a worker (time.monotonic()), for ack_timeout.
        self.sent_at = 0.0
        # How many workers were killed for holding it past ack_timeout.
        self.timeouts = 0

    def __repr__(self) -> str:
        return f"Delivery({self.id}, {self.channel!r}, attempts={self.attempts})"

    def settle(self, outcome: str) -> None:
        """Report the final outcome to whoever waits for it."""
        if self.on_settled is not None:
            self.on_settled(outcome)
            self.on_settled = None


class Instance:
    """One worker process of a broker."""

    def __init__(self, broker: Broker, index: int) -> None:
        self.broker = broker
        self.index = index
        self.state = InstanceState.STOPPED
        self.process: WorkerProcess | None = None
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
        self._outgoing_to: WorkerProcess | None = None
        self._encode = broker.supervisor.encode
        self._backoff: asyncio.TimerHandle | None = None
        self._exited: asyncio.Event = asyncio.Event()
        self._exited.set()

    @property
    def name(self) -> str:
        """``broker:index``, as in logs and ``busctl``."""
        return f"{self.broker.name}:{self.index}"

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
        self.broker.supervisor.announce(self, old, reason)

    # -- starting ----------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the worker process (STARTING); it is RUNNING once it says so."""
        if self.state in (S.STARTING, S.RUNNING, S.STOPPING):
            return
        self._cancel_backoff()
        self.change_state(S.STARTING)
        config = self.broker.config
        supervisor = self.broker.supervisor
        argv = ["--broker", config.name, "--instance", str(self.index)]
        if config.handler:
            argv += ["--handler", config.handler]
        else:
            argv += ["--exec", "--", *config.command]
        env = {
            **os.environ,
            **config.env,
            "BUSD_PID": str(os.getpid()),
            "BUSD_BROKER": config.name,
            "BUSD_INSTANCE": str(self.index),
            supervisor.ORPHAN_MARK: supervisor.identity,
        }
        cwd = supervisor.broker_cwd(config)
        # busd's own package must be importable by the worker wrapper; a
        # handler's module is imported relative to the broker's cwd, like a
        # script's. A command broker gets its own PYTHONPATH back before exec.
        own = env.get("PYTHONPATH", "")
        first = (cwd,) if config.handler else ()
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (*first, supervisor.package_root, own) if p
        )
        if not config.handler:
            env[ORIGINAL_PYTHONPATH] = own
        self.started_at = time.time()
        self.ready_at = None
        try:
            process = await supervisor.spawner().spawn(
                argv, env, cwd, supervisor.process_owner(config), self.name
            )
        except OSError as error:
            log.error("%s: cannot start: %s", self.name, error)
            self.last_exit = f"cannot start: {error}"
            self._after_exit(fast=True)
            return
        self.process = process
        self.pid = process.pid
        self._exited = asyncio.Event()
        log.info("%s: started, PID %d", self.name, self.pid)
        stdout = WorkerStdout(self)
        await process.connect(stdout, stderr_limit=MAX_LOG_LINE)
        background = self.broker.supervisor.background
        background(self._read_log(process))
        background(self._wait_exit(process, stdout))
        if self.state is S.STOPPING:
            # stop() came while the fork server was forking this worker, and
            # found nothing to ask: ask now, and press on as stop() does.
            self._ask_to_stop()
            background(self.stop())

    # -- what the worker says ----------------------------------------------------

    def frames_received(self, frames: list[dict[str, Any] | ProtocolError]) -> None:
        """Act on the frames of one read of the worker's stdout."""
        # The answers (publish --wait) and new deliveries these acks
        # release leave together, at the end.
        with self.broker.supervisor.outbox.hold():
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
                self.broker.acked(done)
        elif kind == "nack":
            delivery = self._take(frame.get("id"))
            if delivery is not None:
                self.nacked += 1
                self.broker.nacked(self, delivery, str(frame.get("error", "")))
        elif kind == "publish":
            self.broker.supervisor.publish_from_worker(self, frame)
        elif kind == "ready":
            if self.state is S.STARTING:
                self.ready_at = time.time()
                self.change_state(S.RUNNING)
                self.broker.dispatch()
        else:
            log.warning("%s: ignoring a frame of unknown type %r", self, kind)

    def _take(self, delivery_id: Any) -> Delivery | None:
        """Remove and return the in-flight delivery with this id.

        None for an id this instance does not hold (unknown, answered
        already) and for anything that is not an id at all: a broker's
        frame may carry any msgpack value there.
        """
        if type(delivery_id) is not int:
            return None
        return self.inflight.pop(delivery_id, None)

    async def _read_log(self, process: WorkerProcess) -> None:
        assert process.stderr is not None
        pid = process.pid
        while True:
            raw = await read_log_line(process.stderr)
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip("\n")
            self.broker.supervisor.worker_log(self, pid, line)

    async def _wait_exit(self, process: WorkerProcess, stdout: WorkerStdout) -> None:
        status = await process.wait()
        # Its last acks first: what it acknowledged is not delivered again.
        await stdout.closed
        self.last_exit = (
            "exit status unknown: the fork server died"
            if status is None
            else describe_status(status)
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
        ran = time.time() - (self.ready_at or time.time())
        fast = self.ready_at is None or ran < FAST_FAILURE_SECONDS
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
        policy = str(self.broker.config.restart)
        if policy == "never" or (policy == "on-failure" and clean):
            self.change_state(S.STOPPED, f"restart = {policy}")
            return
        self.fast_failures = self.fast_failures + 1 if fast else 1
        if self.fast_failures >= MAX_FAST_FAILURES:
            log.error(
                "%s: FATAL after %d fast failures in a row; `busctl start %s` "
                "tries again",
                self.name,
                self.fast_failures,
                self.name,
            )
            self.change_state(S.FATAL, f"{self.fast_failures} fast failures")
            return
        delay = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (self.fast_failures - 1))
        self.change_state(S.BACKOFF, f"restarting in {delay:g} s")
        loop = asyncio.get_running_loop()
        self._backoff = loop.call_later(delay, self._restart_after_backoff)

    def _restart_after_backoff(self) -> None:
        self._backoff = None
        if self.state is S.BACKOFF:
            self.restarts += 1
            self.broker.supervisor.background(self.start())

    def _requeue_inflight(self) -> None:
        if self.inflight:
            deliveries = list(self.inflight.values())
            self.inflight.clear()
            log.warning(
                "%s: %d unacknowledged messages go to another instance",
                self.name,
                len(deliveries),
            )
            self.broker.requeue(self, deliveries)

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
            self.broker.supervisor.outbox.add(self)
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
        return (
            self.state is S.RUNNING
            and len(self.inflight) < self.broker.config.max_inflight
        )

    # -- stopping -----------------------------------------------------------------

    async def stop(self, timeout: float | None = None) -> None:
        """Stop the worker: ask, then SIGTERM, then SIGKILL after ``timeout``.

        The worker is asked first (a ``stop`` frame), so it can finish the
        message in hand; SIGTERM follows half-way through ``timeout``, and
        SIGKILL at its end. Unacknowledged messages go to other instances.
        """
        timeout = self.broker.config.stop_timeout if timeout is None else timeout
        self._cancel_backoff()
        if self.state in (S.BACKOFF, S.FATAL):
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
        timeout = self.broker.config.ack_timeout
        if not timeout or self.state is not S.RUNNING or not self.inflight:
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


class WorkerStdout(asyncio.Protocol):
    """A worker's stdout: each read's frames go straight to the instance.

    (A StreamReader would hand each read on one loop turn later: on the
    path of every ack.)
    """

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.decoder = FrameDecoder(WORKER_MAX_FRAME)
        self.broken = False
        #: Done when the worker's end of the pipe is closed (it exited).
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        """Decode and hand over the frames ``data`` completes."""
        if self.broken:
            return  # read on and drop: the worker is being killed
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as error:
            self.broken = True
            self.instance.broken_frame(error)
            return
        self.instance.frames_received(frames)

    def eof_received(self) -> None:
        """The worker closed stdout; connection_lost follows."""

    def connection_lost(self, exc: Exception | None) -> None:
        """The pipe is closed: the worker exited (or closed its stdout)."""
        if not self.closed.done():
            self.closed.set_result(None)


async def read_log_line(stream: asyncio.StreamReader) -> bytes:
    """The next line of ``stream`` (b"" at its end), cut to ``MAX_LOG_LINE``.

    A longer line keeps its start, marked ``[line truncated]``; the rest of
    it is read and dropped. (``readline()`` would drop the start instead, and
    the rest would come out as pieces of the line's middle.)
    """
    try:
        return await stream.readuntil(b"\n")
    except asyncio.IncompleteReadError as error:
        return error.partial  # the last line had no newline
    except asyncio.LimitOverrunError:
        pass  # the buffer holds more than MAX_LOG_LINE bytes of this line
    head = await stream.read(MAX_LOG_LINE)
    while True:
        try:
            await stream.readuntil(b"\n")
            break
        except asyncio.IncompleteReadError:
            break
        except asyncio.LimitOverrunError as error:
            await stream.read(error.consumed)  # no newline in them
    return head + b" [line truncated]"


def describe_status(status: int) -> str:
    """``exit status 3`` or ``killed by SIGKILL`` from a returncode."""
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"
