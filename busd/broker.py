"""A broker: a pool of worker instances with one bounded queue.

Delivery rules (docs/architecture.md):

- a message accepted for this broker waits in ``queue`` (bounded by
  ``queue_size``: a full queue makes ``publish`` answer ``busy``);
- ``dispatch()`` hands queued messages to RUNNING instances round-robin,
  each holding at most ``max_inflight`` unacknowledged messages;
- an ack settles the message; a nack sends it round again until it has
  failed ``max_retries + 1`` times, then it goes to the ``dead`` channel
  and the log;
- the unacknowledged messages of an instance that dies go back to the head
  of the queue, flagged ``redelivered`` (at-least-once delivery).

Everything here runs on busd's I/O loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING, Any

from busd.config import BrokerConfig
from busd.instance import Delivery, Instance, InstanceState

if TYPE_CHECKING:
    from busd.supervisor import Supervisor

log = logging.getLogger("busd.broker")

DEAD_CHANNEL = "dead"


class Broker:
    """One ``[brokers.NAME]`` table brought to life."""

    def __init__(self, supervisor: Supervisor, config: BrokerConfig) -> None:
        self.supervisor = supervisor
        self.config = config
        self.name = config.name
        self.instances: list[Instance] = []
        self.queue: collections.deque[Delivery] = collections.deque()
        self._next = 0  # round-robin position
        self.accepted = 0
        self.acked_count = 0
        self.retried = 0
        self.dead = 0
        self.redelivered = 0

    # -- the pool -----------------------------------------------------------------

    async def scale(self, count: int) -> None:
        """Run ``count`` instances: start new ones, stop the highest extra ones."""
        new = [Instance(self, i) for i in range(len(self.instances), count)]
        self.instances.extend(new)
        # Together: each start awaits its process's pipes being connected.
        await asyncio.gather(*(instance.start() for instance in new))
        extra = self.instances[count:]
        if extra:
            await asyncio.gather(*(instance.stop() for instance in extra))
            del self.instances[count:]
        self.dispatch()

    async def start(self, index: int | None = None) -> None:
        """Start one instance, or every stopped one."""
        instances = self._select(index)
        for instance in instances:
            instance.reset()
        await asyncio.gather(*(instance.start() for instance in instances))

    async def stop(self, index: int | None = None) -> None:
        """Stop one instance, or all, in parallel."""
        await asyncio.gather(*(i.stop() for i in self._select(index)))

    async def restart(self, index: int | None = None) -> None:
        """Stop then start, one instance after the other (rolling).

        Messages keep flowing to the other instances meanwhile, and what the
        stopped one had not acknowledged is delivered again: none is lost.
        """
        for instance in self._select(index):
            await instance.stop()
            instance.reset()
            await instance.start()
            await self.supervisor.wait_settled([instance])

    def _select(self, index: int | None) -> list[Instance]:
        if index is None:
            return list(self.instances)
        if not 0 <= index < len(self.instances):
            raise LookupError(
                f"broker {self.name!r} has no instance {index} "
                f"(it has {len(self.instances)})"
            )
        return [self.instances[index]]

    # -- messages ---------------------------------------------------------------

    def has_room(self) -> bool:
        """Whether one more message fits in the queue."""
        return len(self.queue) < self.config.queue_size

    def accept(self, delivery: Delivery) -> None:
        """Queue ``delivery`` (the caller checked ``has_room``) and dispatch."""
        self.accepted += 1
        self.queue.append(delivery)
        self.dispatch()

    def dispatch(self) -> None:
        """Hand queued messages to instances with room, round-robin."""
        count = len(self.instances)
        while self.queue and count:
            for offset in range(count):
                instance = self.instances[(self._next + offset) % count]
                if instance.has_room():
                    self._next = (self._next + offset + 1) % count
                    instance.deliver(self.queue.popleft())
                    break
            else:
                return  # every instance is busy or not running

    def acked(self, deliveries: list[Delivery]) -> None:
        """An instance acknowledged ``deliveries`` (one ack frame)."""
        self.acked_count += len(deliveries)
        settled = self.supervisor.settled
        for delivery in deliveries:
            settled(self, delivery, "acked")
        self.dispatch()

    def nacked(self, instance: Instance, delivery: Delivery, error: str) -> None:
        """An instance's listeners failed on ``delivery``: retry or give up."""
        delivery.errors.append(error)
        if delivery.attempts > self.config.max_retries:
            self._bury(instance, delivery, error)
        else:
            self.retried += 1
            log.warning(
                "%s: message %d on %r failed (attempt %d of %d), retrying: %s",
                instance,
                delivery.id,
                delivery.channel,
                delivery.attempts,
                self.config.max_retries + 1,
                error,
            )
            self.queue.appendleft(delivery)
        self.dispatch()

    def _bury(self, instance: Instance, delivery: Delivery, error: str) -> None:
        self.dead += 1
        log.error(
            "%s: message %d on %r failed %d times; sent to the %r channel: %s",
            instance,
            delivery.id,
            delivery.channel,
            delivery.attempts,
            DEAD_CHANNEL,
            error,
        )
        self.supervisor.settled(self, delivery, "dead")
        if delivery.channel != DEAD_CHANNEL:  # a dead letter that dies stays dead
            self.supervisor.publish_dead(self, delivery, error)

    def requeue(self, instance: Instance, deliveries: list[Delivery]) -> None:
        """Put the messages of a dead or stopped instance back, first in line.

        A message that made workers hang past ``ack_timeout`` more than
        ``max_retries`` times is a poison message: it goes to ``dead``
        instead of hanging the next worker too.
        """
        for delivery in reversed(deliveries):
            if delivery.timeouts > self.config.max_retries:
                self._bury(instance, delivery, delivery.errors[-1])
                continue
            delivery.redelivered = True
            self.redelivered += 1
            self.queue.appendleft(delivery)
        self.dispatch()

    # -- reporting ----------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """This broker's row of ``busctl state``."""
        return {
            "channels": list(self.config.channels),
            "handler": self.config.handler,
            "command": list(self.config.command) if self.config.command else None,
            "queued": len(self.queue),
            "queue_size": self.config.queue_size,
            "accepted": self.accepted,
            "acked": self.acked_count,
            "retried": self.retried,
            "dead": self.dead,
            "redelivered": self.redelivered,
            "instances": [self.supervisor.describe_instance(i) for i in self.instances],
        }

    def running(self) -> int:
        """How many instances are RUNNING."""
        return sum(i.state is InstanceState.RUNNING for i in self.instances)
