"""Where a published message goes: the routes of its channel, and back.

The ``Router`` is the one place a message passes through on its way in,
whoever published it (a ``publish`` op, a worker, a dead letter):

- it numbers the message (ids continue after the spool's last one);
- it finds the channel's **routes** and refuses the message (``busy``)
  when any of them is full, so that no route gets it and a retry does not
  duplicate it; with ``strict_channels``, a channel without routes is
  ``unknown_channel``; a ``publish --wait`` is refused (``unavailable``)
  when a route cannot take any message until an operator acts (every
  instance of a broker FATAL or stopped): its answer would never come;
- with a spool, it records the message before any route sees it, and
  records each route's settlement;
- it hands the message to each route as a ``Delivery`` and, for
  ``publish --wait``, counts the routes' outcomes until all are in;
- a message a route gave up on (``dead``) is kept in the dead-letter
  store (busd/deadletters.py) until an operator replays or drops it, and
  published on the ``dead`` channel, as a letter saying why, for brokers
  that want it (a letter that dies there is stored, not published again);
- control clients subscribed to the channel get it too.

A **route** is anything with the :class:`Route` methods. Today every route
is a local broker (busd/supervision/broker.py), handed over by the
supervisor as the routes of the source ``"local"``; another kind of route
(a channel shared across hosts) is another source of routes, added with
:meth:`Router.set_routes` under its own name, with no change here.

Used on the I/O loop only.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from busd.deadletters import DeadLetters
from busd.protocol import DEAD_CHANNEL, ErrorCode, ProtocolError, is_channel_name
from busd.spool import Pending, Spool, SpoolError
from busd.supervision.delivery import Delivery, Outcome

log = logging.getLogger("busd")

#: A control client's view of a channel: (channel, message).
ChannelSubscriber = Callable[[str, Any], None]
#: Called once every route settled a ``--wait`` message: {"acked": n, "dead": m}.
WhenSettled = Callable[[dict[str, int]], None]


class Route(Protocol):
    """Somewhere the messages of some channels go (a broker, a stream...)."""

    @property
    def name(self) -> str:
        """Unique among routes: in logs, answers and spool records."""

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels whose messages this route takes."""

    def busy_reason(self) -> str | None:
        """Why it cannot take one more message now; None when it can."""

    def down_reason(self) -> str | None:
        """Why nothing it holds will be handled until an operator acts; None
        while it works, or will by itself (a restart is due)."""

    def accept(self, delivery: Delivery) -> None:
        """Take ``delivery``; report its end to ``Router.settle``."""

    def restore(self, delivery: Delivery) -> None:
        """Take a spooled message accepted before busd restarted."""


class Router:
    """Channels to routes; every message in, every settlement back."""

    def __init__(
        self, strict_channels: bool = False, dead_letters: DeadLetters | None = None
    ) -> None:
        #: Refuse messages for channels no route takes (``unknown_channel``).
        self.strict_channels = strict_channels
        #: Where dead messages are kept (in memory until a spool brings a file).
        self.dead_letters = dead_letters if dead_letters is not None else DeadLetters()
        self.routes: dict[str, list[Route]] = {}
        self._sources: dict[str, list[Route]] = {}
        self._by_name: dict[str, Route] = {}
        self._subscribers: dict[str, list[ChannelSubscriber]] = {}
        self._ids = itertools.count(1)
        self._spool: Spool | None = None
        self._restored = False
        self.published = 0
        self.unrouted = 0
        #: Why every message is refused now (busd is stopping); None: none is.
        self.refusal: str | None = None

    # -- set-up ---------------------------------------------------------------------

    def use_spool(self, spool: Spool) -> None:
        """Record messages in ``spool``; number new ones after its last id.

        Its unsettled messages are handed to their routes the first time
        routes are set (:meth:`set_routes`).
        """
        self._spool = spool
        self._ids = itertools.count(spool.last_id + 1)
        self._restored = False

    def refuse_publishes(self, reason: str) -> None:
        """Refuse every message from now on, as ``busy`` saying ``reason``.

        At the start of busd's stop: a message accepted later could miss
        the spool (closed at stop) and its brokers (stopped), and be lost.
        """
        self.refusal = reason

    def use_dead_letters(self, store: DeadLetters) -> None:
        """Keep dead letters in ``store`` from now on (the spool's, at start)."""
        self.dead_letters = store

    def close_spool(self) -> None:
        """Close the spool and the dead letters' file (at stop, once no route
        works any more)."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self.dead_letters.close()

    def set_routes(self, source: str, routes: Iterable[Route]) -> None:
        """The routes of ``source`` (``"local"``: the brokers) are now ``routes``."""
        self._sources[source] = list(routes)
        table: dict[str, list[Route]] = {}
        by_name: dict[str, Route] = {}
        for source_routes in self._sources.values():
            for route in source_routes:
                by_name[route.name] = route
                for channel in route.channels:
                    table.setdefault(channel, []).append(route)
        self.routes, self._by_name = table, by_name
        if self._spool is not None and not self._restored:
            self._restored = True
            self._restore(self._spool)

    def _restore(self, spool: Spool) -> None:
        """Queue again what the spool holds from before busd (re)started."""
        for entry in sorted(spool.pending.values(), key=lambda e: e.id):
            for name in sorted(entry.brokers):
                route = self._by_name.get(name)
                if route is None:
                    self._bury_for_lost_route(spool, entry, name)
                    continue
                route.restore(
                    Delivery(entry.id, entry.channel, entry.message, redelivered=True)
                )

    def _bury_for_lost_route(self, spool: Spool, entry: Pending, route: str) -> None:
        """A spooled message's broker is gone from the config: keep it dead.

        Left in the spool it would wait for ever for a broker that never
        comes; in the dead-letter store an operator sees it and can replay
        it to the channel's brokers of today.
        """
        error = f"broker {route} is no longer configured (found in the spool at start)"
        letter, stored = self.dead_letters.add(
            entry.id, entry.channel, entry.message, route, 0, [error]
        )
        log.error(
            "Spooled message %d is for broker %s, which is no longer configured; "
            "it is dead letter %d (`busctl dead show %d`)",
            entry.id,
            route,
            letter.id,
            letter.id,
        )
        if stored:
            spool.settle(entry.id, route)

    # -- messages in ----------------------------------------------------------------

    def publish(
        self,
        channel: str,
        message: Any,
        when_settled: WhenSettled | None = None,
        needs_route: bool = False,
    ) -> dict[str, Any]:
        """Accept ``message`` on ``channel``; return the ``publish`` answer.

        The answer is ``{"id", "brokers", "subscribers"}``. ``when_settled``
        is called once every route settled it, unless no route took it
        (``brokers`` is 0: the caller answers at once). Raises ``busy`` (a
        route is full, the spool cannot record it, or busd is stopping),
        ``unavailable`` (with ``when_settled``: a route is down, so the
        message would wait for an operator, and its caller with it) or, with
        ``strict_channels`` or ``needs_route``, ``unknown_channel``. A
        refused message is not accepted anywhere.
        """
        if self.refusal is not None:
            raise ProtocolError(
                ErrorCode.BUSY,
                f"{self.refusal}: the message was not accepted; try again once "
                "busd runs again",
            )
        routes = self.routes.get(channel, ())
        if not routes and (self.strict_channels or needs_route):
            raise ProtocolError(
                ErrorCode.UNKNOWN_CHANNEL,
                f"no broker listens on channel {channel!r}"
                + (" (strict_channels is on)" if self.strict_channels else ""),
            )
        if when_settled is not None:
            for route in routes:
                down = route.down_reason()
                if down is not None:
                    raise ProtocolError(
                        ErrorCode.UNAVAILABLE,
                        f"{down}; the message was not accepted",
                    )
        for route in routes:
            reason = route.busy_reason()
            if reason is not None:
                raise ProtocolError(ErrorCode.BUSY, f"{reason}; try again later")
        message_id = next(self._ids)
        if self._spool is not None and routes:
            try:
                self._spool.accept(
                    message_id, channel, message, [r.name for r in routes]
                )
            except SpoolError as error:
                raise ProtocolError(
                    ErrorCode.BUSY, f"{error}; the message was not accepted"
                ) from None
        on_settled = None
        if when_settled is not None and routes:
            on_settled = _Tally(len(routes), when_settled)
        for route in routes:
            route.accept(Delivery(message_id, channel, message, on_settled))
        self.published += 1
        if not routes:
            self.unrouted += 1
        subscribers = self._tell_subscribers(channel, message)
        return {"id": message_id, "brokers": len(routes), "subscribers": subscribers}

    def publish_from_worker(self, origin: str, channel: str, message: Any) -> None:
        """A worker published on a busd channel (a Bank that is a broker)."""
        try:
            if not is_channel_name(channel):
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST, f"{channel!r} is not a channel name"
                )
            self.publish(channel, message)
        except ProtocolError as error:
            log.error("%s: its publish on %r was refused: %s", origin, channel, error)

    # -- settlements back -----------------------------------------------------------

    def settle(
        self, route: str, delivery: Delivery, outcome: Outcome, error: str
    ) -> None:
        """``route`` is done with ``delivery``: acked, or dead after ``error``."""
        forget = True
        if outcome == "dead":
            # Stored before the spool forgets it: a crash in between leaves
            # the message in both (delivered again), never in neither.
            letter, forget = self.dead_letters.add(
                delivery.id,
                delivery.channel,
                delivery.message,
                route,
                delivery.attempts,
                delivery.errors,
            )
        if self._spool is not None and forget:
            self._spool.settle(delivery.id, route)
        delivery.settle(outcome)
        if outcome == "dead" and delivery.channel != DEAD_CHANNEL:
            # A dead letter that dies there is stored, and not published
            # again: no letter about a letter.
            self._publish_dead(route, delivery, letter.id)

    def _publish_dead(self, route: str, delivery: Delivery, letter_id: int) -> None:
        """Tell the ``dead`` channel's brokers and subscribers of a dead message."""
        letter = {
            "broker": route,
            "id": delivery.id,
            "channel": delivery.channel,
            "message": delivery.message,
            "attempts": delivery.attempts,
            "errors": delivery.errors,
            "letter": letter_id,
        }
        if not self.routes.get(DEAD_CHANNEL):
            # No broker takes the channel: the store keeps the letter, so
            # it is not an unrouted message (nor, with strict_channels, a
            # refused one); subscribers still hear of it.
            self._tell_subscribers(DEAD_CHANNEL, letter)
            return
        try:
            self.publish(DEAD_CHANNEL, letter)
        except ProtocolError as refusal:
            log.error(
                "Dead letter %d (message %d of broker %s) could not be published "
                "on the %r channel (%s); it is kept in the dead-letter store",
                letter_id,
                delivery.id,
                route,
                DEAD_CHANNEL,
                refusal.message,
            )

    # -- control clients subscribed to channels -----------------------------------

    def subscribe(self, channel: str, subscriber: ChannelSubscriber) -> None:
        """Send every message published on ``channel`` to ``subscriber``."""
        self._subscribers.setdefault(channel, []).append(subscriber)

    def unsubscribe(self, channel: str, subscriber: ChannelSubscriber) -> None:
        """Undo ``subscribe``."""
        listeners = self._subscribers.get(channel, [])
        if subscriber in listeners:
            listeners.remove(subscriber)
        if not listeners:
            self._subscribers.pop(channel, None)

    def _tell_subscribers(self, channel: str, message: Any) -> int:
        listeners = self._subscribers.get(channel, ())
        for subscriber in list(listeners):
            subscriber(channel, message)
        return len(listeners)


class _Tally:
    """Counts a ``--wait`` message's outcomes; calls back when all are in."""

    __slots__ = ("expected", "outcomes", "when_settled")

    def __init__(self, expected: int, when_settled: WhenSettled) -> None:
        self.expected = expected
        self.outcomes = {"acked": 0, "dead": 0}
        self.when_settled = when_settled

    def __call__(self, outcome: Outcome) -> None:
        outcomes = self.outcomes
        outcomes[outcome] += 1
        if outcomes["acked"] + outcomes["dead"] == self.expected:
            self.when_settled(outcomes)
