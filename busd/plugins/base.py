"""The plugin base class: methods named after channels subscribe themselves."""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself costs a worker's start a few ms
if TYPE_CHECKING:
    from busd.bus import Bus


class SimplePlugin:
    """A plugin whose methods named after bus channels become listeners.

    A subclass defines ``start``, ``stop``, ``exit``, ``graceful``, ``main``
    (or any channel the bus knows) and calls ``subscribe()``. A method may
    carry a ``priority`` attribute; it is honoured as for any listener.
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    def subscribe(self) -> None:
        """Subscribe each method named after a channel of the bus."""
        for channel in list(self.bus.listeners):
            method = getattr(self, channel, None)
            if method is not None:
                self.bus.subscribe(channel, method)

    def unsubscribe(self) -> None:
        """Undo ``subscribe()``."""
        for channel in list(self.bus.listeners):
            method = getattr(self, channel, None)
            if method is not None:
                self.bus.unsubscribe(channel, method)
