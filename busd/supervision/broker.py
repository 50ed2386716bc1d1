"""A broker: a pool of worker instances with one bounded queue.

Delivery rules (docs/architecture.md):

- a message accepted for this broker waits in ``queue`` (bounded by
  ``queue_size``: a full queue makes ``publish`` answer ``busy``);
- ``dispatch()`` hands queued messages to RUNNING instances round-robin,
  each holding at most ``max_inflight`` unacknowledged messages;
- an ack settles the message; a nack sends it round again until it has
  failed ``max_retries + 1`` times, then it is settled ``dead`` (the router
  publishes it on the ``dead`` channel);
- the unacknowledged messages of an instance that dies or is stopped go
  back to the head of the queue, flagged ``redelivered`` (at-least-once).

A broker is a *route* of the router (busd/router.py): ``name``,
``busy_reason()``, ``down_reason()``, ``accept()`` and ``restore()``.
Everything here runs on busd's I/O loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging

from busd.config import BrokerConfig
from busd.protocol import DEAD_CHANNEL
from busd.supervision.delivery import Delivery
from busd.supervision.instance import Instance
from busd.supervision.services import PoolServices
from busd.supervision.states import InstanceState

log = logging.getLogger("busd.broker")


class Broker:
    """One ``[brokers.NAME]`` table brought to life."""

    def __init__(self, config: BrokerConfig, services: PoolServices) -> None:
        self.config = config
        self.name = config.name
        self.services = services
        self.instances: list[Instance] = []
        self.queue: collections.deque[Delivery] = collections.deque()
        self._next = 0  # round-robin position
        self.accepted = 0
        self.acked_count = 0
        self.retried = 0
        self.dead = 0
        self.redelivered = 0

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels whose messages this broker takes."""
        return self.config.channels

    def reconfigure(self, config: BrokerConfig) -> None:
        """Take a reloaded config (same name); instances read it from now on."""
        self.config = config
        for instance in self.instances:
            instance.config = config

    # -- the pool -----------------------------------------------------------------

    async def scale(self, count: int) -> None:
        """Run ``count`` instances: start new ones, stop the highest extra ones."""
        new = [
            Instance(self.config, i, self, self.services)
            for i in range(len(self.instances), count)
        ]
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
        instances = self.select(index)
        for instance in instances:
            instance.reset()
        await asyncio.gather(*(instance.start() for instance in instances))

    async def stop(self, index: int | None = None) -> None:
        """Stop one instance, or all, in parallel."""
        await asyncio.gather(*(i.stop() for i in self.select(index)))

    async def restart(self, index: int | None = None) -> None:
        """Stop then start, one instance after the other (rolling).

        Messages keep flowing to the other instances meanwhile, and what the
        stopped one had not acknowledged is delivered again: none is lost.
        """
        for instance in self.select(index):
            await instance.restart()
            await self.services.wait_settled([instance])

    def select(self, index: int | None) -> list[Instance]:
        """Instance ``index``, or every instance (None); LookupError if none."""
        if index is None:
            return list(self.instances)
        if not 0 <= index < len(self.instances):
            raise LookupError(
                f"broker {self.name!r} has no instance {index} "
                f"(it has {len(self.instances)})"
            )
        return [self.instances[index]]

    def running(self) -> int:
        """How many instances are RUNNING."""
        return sum(i.state is InstanceState.RUNNING for i in self.instances)

    # -- messages (the route) -----------------------------------------------------

    def busy_reason(self) -> str | None:
        """Why one more message does not fit now, or None when it does."""
        if len(self.queue) < self.config.queue_size:
            return None
        return (
            f"broker {self.name!r} has {len(self.queue)} messages queued "
            f"(queue_size {self.config.queue_size})"
        )

    def down_reason(self) -> str | None:
        """Why no instance will take a message until an operator acts, or None.

        None while any instance runs or will (STARTING, RUNNING, BACKOFF,
        restarting); a reason naming each instance's state when every one is
        FATAL or STOPPED, or when there is none.
        """
        if any(instance.can_run() for instance in self.instances):
            return None
        if not self.instances:
            return (
                f"broker {self.name!r} has no instances "
                f"(`busctl scale {self.name} N` starts some)"
            )
        states = ", ".join(f"{i.name} {i.condition()}" for i in self.instances)
        return (
            f"no instance of broker {self.name!r} can run: {states} "
            f"(`busctl start {self.name}` starts them; `busctl logs {self.name}` "
            "says why they stopped)"
        )

    def accept(self, delivery: Delivery) -> None:
        """Queue ``delivery`` (the caller checked ``busy_reason``) and dispatch."""
        self.accepted += 1
        self.queue.append(delivery)
        self.dispatch()

    def restore(self, delivery: Delivery) -> None:
        """Queue a message accepted before busd restarted (from the spool).

        Not dispatched here: the instances are not started yet.
        """
        self.queue.append(delivery)

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

    # -- what instances report (the Pool protocol) ------------------------------

    def acked(self, deliveries: list[Delivery]) -> None:
        """An instance acknowledged ``deliveries`` (one ack frame)."""
        self.acked_count += len(deliveries)
        settle, name = self.services.settle, self.name
        for delivery in deliveries:
            settle(name, delivery, "acked", "")
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
        self.services.settle(self.name, delivery, "dead", error)

    def abandon(self, error: str) -> int:
        """Settle every queued message ``dead`` after ``error``; how many.

        For a broker that is going away (removed by a reload), once its
        instances are stopped: their unacknowledged messages are queued.
        """
        stranded, self.queue = self.queue, collections.deque()
        for delivery in stranded:
            delivery.errors.append(error)
            self.dead += 1
            self.services.settle(self.name, delivery, "dead", error)
        return len(stranded)

    def requeue(self, instance: Instance, deliveries: list[Delivery]) -> None:
        """Put the messages of a dead or stopped instance back, first in line.

        A message that made workers hang past ``ack_timeout`` more than
        ``max_retries`` times is a poison message: it is dead, instead of
        hanging the next worker too.
        """
        for delivery in reversed(deliveries):
            if delivery.timeouts > self.config.max_retries:
                self._bury(instance, delivery, delivery.errors[-1])
                continue
            delivery.redelivered = True
            self.redelivered += 1
            self.queue.appendleft(delivery)
        self.dispatch()
