"""Writes gathered per loop turn: one write per socket or pipe, not per frame.

Everything busd sends (answers and events to clients, deliveries to
workers) is queued by its connection or instance, which then tells the
:class:`Outbox` it has something to write. The outbox writes every queued
destination once:

- at the end of the callback that handles incoming bytes, when that
  callback holds it (``with outbox.hold():``): a read of 50 requests is
  answered, and its messages delivered, with one write each, and without
  waiting for another loop turn;
- otherwise on the next turn of the event loop (a timer, a task).

Answers to clients are written before deliveries to workers: a client
waiting for ``publish`` should not wait behind a worker's wake-up.

Used on busd's I/O loop only.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Sink(Protocol):
    """Something with frames queued, written by ``write_queued()``."""

    def write_queued(self) -> None:
        """Write what is queued, in one write."""


class Outbox:
    """The destinations with something queued, written once per turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # Insertion-ordered sets: clients first, then workers.
        self._answers: dict[Sink, None] = {}
        self._deliveries: dict[Sink, None] = {}
        self._scheduled = False
        self._held = 0

    def add(self, sink: Sink, answer: bool = False) -> None:
        """``sink`` has frames queued; ``answer`` when they go to a client."""
        (self._answers if answer else self._deliveries)[sink] = None
        if not self._held and not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def hold(self) -> Outbox:
        """``with outbox.hold():`` gathers what is queued inside the block
        and writes it at the block's end (blocks may nest)."""
        return self

    def __enter__(self) -> None:
        self._held += 1

    def __exit__(self, *exc_info: object) -> None:
        self._held -= 1
        if not self._held:
            self.flush()

    def flush(self) -> None:
        """Write every queued destination: answers first."""
        self._scheduled = False
        while self._answers or self._deliveries:
            answers, self._answers = self._answers, {}
            for sink in answers:
                sink.write_queued()
            deliveries, self._deliveries = self._deliveries, {}
            for sink in deliveries:
                sink.write_queued()
