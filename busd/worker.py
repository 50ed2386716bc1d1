"""The worker side of a broker: one process, its own bus, frames on stdio.

Every broker instance runs :func:`main` with the command line of
``python -m busd.worker``; busd's fork server (busd/forkserver.py) calls it
in a freshly forked child, which saves the interpreter start:

- ``--handler module:Class`` runs a Python broker here: ``Class(bus)`` is
  built on this process's own :class:`WorkerBus` (a ``busd.Bus``), its
  ``subscribe()`` is called if it has one (a ``SimplePlugin``), the bus is
  started, and every message busd delivers on channel C becomes
  ``bus.publish(C, message)``. Listeners that return are an ack; a listener
  that raises is a nack carrying the error. While the listeners run,
  ``bus.delivery`` is busd's whole ``deliver`` frame (``id``, ``channel``,
  ``message``, ``attempt``, and ``redelivered``: true when an instance
  that had it died before acknowledging, so the work may have been done
  once already); it is None between deliveries.
- ``--exec -- PROG ARGS`` runs a broker written in any language: the
  parent-death signal is set, then the program replaces this process and
  speaks the broker protocol itself (docs/broker-protocol.md).

Either way the process dies with busd: forked by busd's fork server, it
is busd's own child (busd/forkserver.py) when :func:`main` sets its
parent-death signal (``PR_SET_PDEATHSIG``, SIGTERM) against busd, which
the exec keeps. So no worker outlives busd, and none dies with the fork
server. The frames
travel on stdin (busd -> worker) and stdout (worker -> busd); stderr is the
worker's log. In a Python worker, ``print`` and anything else written to
``sys.stdout`` goes to stderr, so it cannot corrupt the protocol.

No ``main`` ticks are published in a worker: ``main`` is an ordinary
channel there, carrying messages. Periodic work uses the ``Monitor``
plugin.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import select
import signal
import sys
import threading
import time
import traceback

from busd.bus import Bus, ChannelFailures
from busd.protocol import (
    ORIGINAL_PYTHONPATH,
    FrameDecoder,
    FrameEncoder,
    ProtocolError,
)

# typing costs every worker's start a few ms; annotations don't need it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, BinaryIO

# Acks of messages handled one after the other are written together, in
# one frame, but none waits longer than this for the ones after it.
ACK_DELAY = 0.002

# Frames from busd are at most this large (busd's own max_frame applies to
# what clients publish; a worker gets those messages and a small envelope).
MAX_FRAME = 64 << 20

PR_SET_PDEATHSIG = 1
PARENT_PID_VARIABLE = "BUSD_PID"


class WorkerBus(Bus):
    """The bus of a worker process, with a way to publish back to busd."""

    def __init__(self, uplink: Uplink | None = None) -> None:
        super().__init__()
        self.uplink = uplink
        #: The ``deliver`` frame being handled, or None (module docstring).
        self.delivery: dict[str, Any] | None = None

    def publish_upstream(self, channel: str, message: Any) -> None:
        """Publish ``message`` on busd's ``channel`` (to every broker on it)."""
        if self.uplink is None:
            raise RuntimeError("this bus is not connected to busd")
        self.uplink.send({"type": "publish", "channel": channel, "message": message})


class Uplink:
    """Frames to busd on the worker's protocol stream; safe from any thread."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._encode = FrameEncoder()  # used under the lock only

    def send(self, frame: dict[str, Any]) -> None:
        """Write one frame and flush it."""
        with self._lock:
            self._stream.write(self._encode(frame))
            self._stream.flush()


def one_line(message: str) -> str:
    """``message`` on one line; a traceback becomes "exception (at file:line)"."""
    lines = message.rstrip().splitlines()
    if len(lines) <= 1:
        return message.rstrip()
    head, exception = lines[0], lines[-1].strip()
    frames = [line.strip() for line in lines if line.strip().startswith('File "')]
    where = ""
    if frames:
        # 'File "/path/x.py", line 86, in parse_order'
        path, _, rest = frames[-1][len('File "') :].partition('", line ')
        number, _, function = rest.partition(", in ")
        where = f" (at {os.path.basename(path)}:{number} in {function})"
    if "Traceback (most recent call last):" not in lines:
        return " | ".join(line.strip() for line in lines)
    return f"{head}: {exception}{where}"


def set_parent_death_signal(
    signum: int = signal.SIGTERM, parent: int | None = None
) -> None:
    """Have the kernel send ``signum`` to this process when its parent dies.

    The parent must be ``parent`` (busd's PID; by default ``$BUSD_PID``).
    If it is not, busd died before this call and the signal will never
    come: exit now.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    expected = parent or os.environ.get(PARENT_PID_VARIABLE)
    if expected and os.getppid() != int(expected):
        os._exit(1)


def load_handler(spec: str) -> Callable[[Bus], Any]:
    """Import ``module:Class``; raise ValueError saying what is wrong.

    ``Class`` is called with the worker's bus: a class, or any factory.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"handler {spec!r} is not of the form 'module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"cannot import handler module {module_name!r}: {error}"
        ) from None
    try:
        handler: Callable[[Bus], Any] = getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no {attribute!r}") from None
    return handler


class Worker:
    """Runs a Python broker class and serves busd's deliveries to it."""

    def __init__(self, handler: str, broker: str, instance: int) -> None:
        self.broker = broker
        self.instance = instance
        # The protocol keeps the real stdout; print() goes to the log.
        self._protocol_out = os.fdopen(os.dup(1), "wb", buffering=0)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        self.uplink = Uplink(self._protocol_out)
        self.bus = WorkerBus(self.uplink)
        self.bus.subscribe("log", self._log)
        self.handler = load_handler(handler)(self.bus)
        if hasattr(self.handler, "subscribe"):
            self.handler.subscribe()
        self._wakeup_read, wakeup_write = os.pipe()
        os.set_blocking(wakeup_write, False)
        signal.set_wakeup_fd(wakeup_write)
        # The handlers only record; the loop below notices through the
        # wake-up pipe and exits the bus on the main thread.
        self._signalled: list[int] = []
        # Ids handled since the last ack frame, and when the first was.
        self._acks: list[int] = []
        self._acks_since = 0.0
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda number, frame: self._signalled.append(number))

    def _log(self, message: str, level: int = logging.INFO) -> None:
        # One line per event on stderr, which busd files under this broker:
        # "ERROR: text" sets the level there; a traceback is cut down to the
        # exception and where it was raised.
        prefix = "" if level == logging.INFO else f"{logging.getLevelName(level)}: "
        sys.stderr.write(f"{prefix}{one_line(message)}\n")
        sys.stderr.flush()

    def run(self) -> int:
        """Start the bus, report ready, serve deliveries until told to stop."""
        self.bus.start()
        self.uplink.send({"type": "ready", "pid": os.getpid()})
        decoder = FrameDecoder(MAX_FRAME)
        stdin = sys.stdin.buffer.fileno()
        try:
            while not self._signalled:
                readable, _, _ = select.select([stdin, self._wakeup_read], [], [])
                if self._wakeup_read in readable:
                    os.read(self._wakeup_read, 512)
                    continue
                data = os.read(stdin, 1 << 16)
                if not data:
                    break  # busd closed our stdin: it is gone or done with us
                try:
                    for frame in decoder.feed(data):
                        if isinstance(frame, ProtocolError) or not self._handle(frame):
                            self._send_acks()
                            return self._finish()
                finally:
                    # What came in one read is acknowledged in one write.
                    self._send_acks()
        except ProtocolError as error:
            self._log(f"broken frame from busd: {error.message}", logging.ERROR)
        return self._finish()

    def _handle(self, frame: dict[str, Any]) -> bool:
        """Act on one frame from busd; False when it asks us to stop."""
        kind = frame.get("type")
        if kind == "stop":
            return False
        if kind != "deliver":
            self._log(f"ignoring a frame of unknown type {kind!r}", logging.WARNING)
            return True
        self.bus.delivery = frame
        started = time.monotonic()
        try:
            self.bus.publish(frame["channel"], frame["message"])
        except ChannelFailures as failures:
            errors = "; ".join(
                "".join(traceback.format_exception_only(e)).strip()
                for e in failures.get_instances()
            )
            self._send_acks()
            self.uplink.send({"type": "nack", "id": frame["id"], "error": errors})
        else:
            self._ack(frame["id"], started)
        finally:
            self.bus.delivery = None
        return True

    def _ack(self, delivery_id: int, started: float) -> None:
        """Acknowledge a message: now, or with the next ones of this read.

        One frame and one write for a run of quick messages saves busd and
        this process a wake-up each. A message whose handler took
        ``ACK_DELAY`` or more is acknowledged at once, and so is any ack
        that has waited that long; a quick one may wait for the handler of
        the next message of the same read. A worker killed before it wrote
        its acks has those messages delivered again, flagged
        ``redelivered`` (at-least-once).
        """
        now = time.monotonic()
        if not self._acks:
            self._acks_since = now
        self._acks.append(delivery_id)
        if now - min(started, self._acks_since) >= ACK_DELAY:
            self._send_acks()

    def _send_acks(self) -> None:
        if not self._acks:
            return
        ids, self._acks = self._acks, []
        if len(ids) == 1:
            self.uplink.send({"type": "ack", "id": ids[0]})
        else:
            self.uplink.send({"type": "ack", "ids": ids})

    def _finish(self) -> int:
        self.bus.exit()
        return 0


USAGE = (
    "usage: python -m busd.worker [--broker NAME] [--instance N]\n"
    "                             (--handler MODULE:CLASS | --exec -- PROG [ARG...])"
)


def parse_arguments(arguments: list[str]) -> tuple[dict[str, str], list[str] | None]:
    """The worker's options, and the program after ``--exec`` (or None).

    Only busd writes this command line; a small parser instead of argparse
    saves every worker's start the import (about a tenth of it).
    Raises ValueError naming what is wrong.
    """
    # Everything after --exec is the program's argv, verbatim.
    command: list[str] | None = None
    if "--exec" in arguments:
        at = arguments.index("--exec")
        arguments, command = arguments[:at], arguments[at + 1 :]
        if command[:1] == ["--"]:
            command = command[1:]
        if not command:
            raise ValueError("--exec needs a program")
    options = {"--broker": "broker", "--instance": "0", "--handler": ""}
    pairs = iter(arguments)
    for name in pairs:
        name, equals, value = name.partition("=")
        if name not in options:
            raise ValueError(f"unknown argument {name!r}")
        given: str | None = value
        if not equals:
            given = next(pairs, None)
        if given is None:
            raise ValueError(f"{name} needs a value")
        options[name] = given
    if not options["--instance"].isdigit():
        raise ValueError(f"--instance needs a number, got {options['--instance']!r}")
    if (command is None) == (not options["--handler"]):
        raise ValueError("give exactly one of --handler MODULE:CLASS, --exec -- PROG")
    return options, command


def main(argv: list[str] | None = None, parent: int | None = None) -> int:
    """Entry point of ``python -m busd.worker``.

    ``parent`` is busd's PID, the parent this process dies with (by default
    ``$BUSD_PID``); the fork server passes it (busd/forkserver.py).
    """
    arguments = sys.argv[1:] if argv is None else list(argv)
    try:
        options, command = parse_arguments(arguments)
    except ValueError as error:
        print(f"{USAGE}\npython -m busd.worker: error: {error}", file=sys.stderr)
        return 2
    set_parent_death_signal(parent=parent)
    if command is not None:
        # busd set PYTHONPATH so that this wrapper finds busd; the program
        # gets the environment its broker was configured with.
        original = os.environ.pop(ORIGINAL_PYTHONPATH, None)
        if original is not None:
            if original:
                os.environ["PYTHONPATH"] = original
            else:
                os.environ.pop("PYTHONPATH", None)
        try:
            os.execvp(command[0], command)
        except OSError as error:
            print(
                f"error: cannot run {command[0]!r}: {error.strerror}", file=sys.stderr
            )
            return 127
    handler = options["--handler"]
    try:
        worker = Worker(handler, options["--broker"], int(options["--instance"]))
    except Exception as error:
        print(f"error: cannot start handler {handler!r}: {error}", file=sys.stderr)
        traceback.print_exc()
        return 1
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
