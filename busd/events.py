"""State changes (the bus's, each instance's) for ``busctl events`` clients.

Used on the I/O loop only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

EventFollower = Callable[[dict[str, Any]], None]


class EventHub:
    """Who follows events on the control socket."""

    def __init__(self) -> None:
        self.followers: list[EventFollower] = []

    def follow(self, follower: EventFollower) -> None:
        """Send every event to ``follower``."""
        self.followers.append(follower)

    def unfollow(self, follower: EventFollower) -> None:
        """Undo ``follow``."""
        if follower in self.followers:
            self.followers.remove(follower)

    def emit(self, event: dict[str, Any]) -> None:
        """Send ``event`` to every follower."""
        for follower in list(self.followers):
            follower(event)
