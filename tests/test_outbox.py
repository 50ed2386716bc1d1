"""The write path's parts on a real event loop: the Outbox, and WorkerPipes
on a real child process (the whole daemon is tested elsewhere)."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from busd.instance import WorkerPipes
from busd.outbox import Outbox
from busd.protocol import ProtocolError, encode_frame

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
    """What WorkerPipes hands frames to (the real one needs a whole broker)."""

    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.broken: list[str] = []

    def frames_received(self, frames: list[Any]) -> None:
        self.frames += frames

    def broken_frame(self, error: ProtocolError) -> None:
        self.broken.append(error.message)


async def until(check: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {DEADLINE} s"
        await asyncio.sleep(0.005)


def run_child(script: str, attach_when: Any) -> Instance:
    """Run ``script`` with WorkerPipes; attach once ``attach_when(pipes)``."""

    async def scenario() -> Instance:
        loop = asyncio.get_running_loop()
        instance = Instance()
        transport, pipes = await loop.subprocess_exec(
            lambda: WorkerPipes(instance, loop),  # type: ignore[arg-type]
            sys.executable,
            "-c",
            script,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        process = asyncio.subprocess.Process(transport, pipes, loop)
        try:
            await until(lambda: attach_when(pipes), "data before attach")
            pipes.attach()
            assert await asyncio.wait_for(process.wait(), DEADLINE) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        return instance

    return asyncio.run(scenario())


def write_script(*chunks: bytes) -> str:
    return (
        "import sys\n"
        + "".join(
            f"sys.stdout.buffer.write({c!r}); sys.stdout.flush()\n" for c in chunks
        )
        + "sys.stderr.write('a log line\\n')\n"
    )


def test_frames_that_come_before_attach_are_kept_for_it() -> None:
    frames = encode_frame({"type": "ready", "pid": 1}) + encode_frame(
        {"type": "ack", "ids": [1, 2]}
    )
    instance = run_child(
        write_script(frames[:7], frames[7:]),
        attach_when=lambda pipes: sum(map(len, pipes._early or ())) == len(frames),
    )
    assert instance.frames == [
        {"type": "ready", "pid": 1},
        {"type": "ack", "ids": [1, 2]},
    ]
    assert instance.broken == []


def test_after_a_broken_frame_the_rest_of_stdout_is_read_and_dropped() -> None:
    too_large = (100 << 20).to_bytes(4, "big")
    instance = run_child(
        write_script(too_large, encode_frame({"type": "ack", "id": 1})),
        attach_when=lambda pipes: True,
    )
    # The process could exit (wait() returned): its stdout was read to the end.
    assert len(instance.broken) == 1 and "over the maximum" in instance.broken[0]
    assert instance.frames == []
