"""One message on its way to one broker, and how it can end."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

#: How a delivery ends: acknowledged, or given up after its retries.
Outcome = Literal["acked", "dead"]


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
        on_settled: Callable[[Outcome], None] | None = None,
        redelivered: bool = False,
    ) -> None:
        self.id = id
        self.channel = channel
        self.message = message
        # Called once with the outcome (publish --wait listens here).
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

    def settle(self, outcome: Outcome) -> None:
        """Report the final outcome to whoever waits for it (once)."""
        if self.on_settled is not None:
            self.on_settled(outcome)
            self.on_settled = None
