"""examples/stock.py, run for real: two processes, Ctrl-C, and --orders."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
from helpers import default_sigint

STOCK = Path(__file__).resolve().parents[1] / "examples" / "stock.py"

# Generous for a loaded 2-core machine; a healthy run needs well under 1 s.
DEADLINE_SECONDS = 8.0

BROKER_STARTED = re.compile(r"Broker started, PID (\d+)")
ORDER_PLACED = re.compile(
    r"Broker\[(\d+)\] .*(BUY|SELL) order placed for \d+ [A-Z]{4}$"
)
BUS_EXITED = re.compile(r"\[(\d+)\] \w+ Bus EXITED$")


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


class Demo:
    """examples/stock.py in a new session, its stderr read line by line."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(STOCK), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, for killpg
            preexec_fn=default_sigint,  # as in a terminal, whoever runs the tests
        )
        self.lines: list[str] = []
        self._incoming: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._incoming.put(line.rstrip("\n"))
        self._incoming.put(None)  # EOF: every process holding stderr is gone

    def wait_for(self, pattern: re.Pattern[str], deadline: float) -> re.Match[str]:
        """Return the first match of ``pattern`` in a line, reading until then."""
        for line in self.lines:
            if match := pattern.search(line):
                return match
        while True:
            try:
                line = self._incoming.get(timeout=_left(deadline))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if match := pattern.search(line):
                return match
        raise AssertionError(f"no line matches {pattern.pattern!r}:\n{self.output}")

    def finish(self, deadline: float) -> int:
        """Wait for the exit status and for the end of stderr; return the status."""
        status = self.process.wait(timeout=_left(deadline))
        while (line := self._incoming.get(timeout=_left(deadline))) is not None:
            self.lines.append(line)
        return status

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        """Kill whatever is left of the demo's process group, then reap."""
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@contextmanager
def demo(*args: str) -> Iterator[Demo]:
    running = Demo(*args)
    try:
        yield running
    finally:
        running.kill()


def exited_pids(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := BUS_EXITED.search(line))]


def assert_gone(*pids: int) -> None:
    for pid in pids:
        assert not psutil.pid_exists(pid), f"process {pid} is still there"


def test_ctrl_c_stops_bank_and_broker_cleanly() -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    with demo("--interval", "0.05") as stock:
        main_pid = stock.process.pid
        broker_pid = int(stock.wait_for(BROKER_STARTED, deadline).group(1))
        order = stock.wait_for(ORDER_PLACED, deadline)
        assert int(order.group(1)) == broker_pid

        os.killpg(main_pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        status = stock.finish(deadline)

        assert status == 0, stock.output
        assert sorted(exited_pids(stock.lines)) == sorted([main_pid, broker_pid]), (
            stock.output
        )
        assert "Broker stopped, exit code 0" in stock.output
        assert "Traceback" not in stock.output
        assert_gone(main_pid, broker_pid)


def test_orders_option_stops_after_that_many_orders() -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    with demo("--interval", "0.05", "--orders", "3") as stock:
        main_pid = stock.process.pid
        status = stock.finish(deadline)

        assert status == 0, stock.output
        broker_pid = int(stock.wait_for(BROKER_STARTED, deadline).group(1))
        placed = [line for line in stock.lines if ORDER_PLACED.search(line)]
        assert len(placed) == 3, stock.output
        assert sorted(exited_pids(stock.lines)) == sorted([main_pid, broker_pid])
        assert "Traceback" not in stock.output
        assert_gone(main_pid, broker_pid)
