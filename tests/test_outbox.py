"""The Outbox on a real event loop (the whole daemon is tested elsewhere).

WorkerStdout, the other part of the I/O path, reading a real child
process, is tested with the broker protocol in test_broker_protocol.py."""

from __future__ import annotations

import asyncio

from busd.outbox import Outbox


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
