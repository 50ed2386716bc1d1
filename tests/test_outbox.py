"""The I/O path's parts on a real event loop: the Outbox, and WorkerStdout
reading a real child process (the whole daemon is tested elsewhere)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

from busd.outbox import Outbox
from busd.protocol import ProtocolError, encode_frame
from busd.supervision.pipes import WorkerStdout

DEADLINE = 10.0


class Sink:
    """Records when it was asked to write, into a log shared by sinks."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def write_queued(self) -> None:
        self.log.append(self.name)


def test_writes_inside_a_hold_leave_once_at_its_end_answers_first() -> None:
    async def scenario() -> list[list[str]]:
        outbox = Outbox(asyncio.get_running_loop())
        log: list[str] = []
        worker, client = Sink("worker", log), Sink("client", log)
        seen = []
        with outbox.hold():
            outbox.add(worker)
            outbox.add(client, answer=True)
            outbox.add(worker)  # queued twice, written once
            with outbox.hold():  # nested: only the outer end writes
                outbox.add(client, answer=True)
            seen.append(list(log))
        seen.append(list(log))
        # Outside a hold: written on the next loop turn, not at once.
        outbox.add(worker)
        seen.append(list(log))
        await asyncio.sleep(0)
        seen.append(list(log))
        return seen

    inside, after_hold, queued, next_turn = asyncio.run(scenario())
    assert inside == []
    assert after_hold == ["client", "worker"]
    assert queued == ["client", "worker"]
    assert next_turn == ["client", "worker", "worker"]


class Instance:
    """What WorkerStdout hands frames to (the real one needs a whole broker)."""

    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.broken: list[str] = []

    def frames_received(self, frames: list[Any]) -> None:
        self.frames += frames

    def broken_frame(self, error: ProtocolError) -> None:
        self.broken.append(error.message)


def read_child_stdout(*chunks: bytes) -> Instance:
    """Run a child that writes ``chunks`` to stdout, read as busd reads a
    worker's: WorkerStdout on a pipe of its own; return what it handed on."""

    async def scenario() -> Instance:
        loop = asyncio.get_running_loop()
        instance = Instance()
        script = "import sys, time\n" + "".join(
            f"sys.stdout.buffer.write({c!r}); sys.stdout.flush(); time.sleep(0.01)\n"
            for c in chunks
        )
        frames_out, frames_in = os.pipe()
        child = subprocess.Popen([sys.executable, "-c", script], stdout=frames_in)
        os.close(frames_in)
        try:
            stdout = WorkerStdout(instance.frames_received, instance.broken_frame)
            pipe = os.fdopen(frames_out, "rb", buffering=0)
            await loop.connect_read_pipe(lambda: stdout, pipe)
            await asyncio.wait_for(stdout.closed, DEADLINE)  # the child exited
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(DEADLINE)
        assert child.returncode == 0
        return instance

    return asyncio.run(scenario())


def test_frames_are_handed_on_as_they_come_even_split_across_reads() -> None:
    frames = encode_frame({"type": "ready", "pid": 1}) + encode_frame(
        {"type": "ack", "ids": [1, 2]}
    )
    instance = read_child_stdout(frames[:7], frames[7:20], frames[20:])
    assert instance.frames == [
        {"type": "ready", "pid": 1},
        {"type": "ack", "ids": [1, 2]},
    ]
    assert instance.broken == []


def test_after_a_broken_frame_the_rest_of_stdout_is_read_and_dropped() -> None:
    too_large = (100 << 20).to_bytes(4, "big")
    instance = read_child_stdout(too_large, encode_frame({"type": "ack", "id": 1}))
    # `closed` came: the pipe was read to its end, nothing more handed on.
    assert len(instance.broken) == 1 and "over the maximum" in instance.broken[0]
    assert instance.frames == []
