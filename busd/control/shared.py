"""What the control server shares with each of its connections.

A connection is given this when it is made and reads today's settings and
policy from it (a reload replaces them here); it never reaches up to the
server itself.
"""

from __future__ import annotations

from busd.control.access import AccessPolicy
from busd.control.requests import Connection, Op
from busd.control.settings import ServerSettings
from busd.outbox import Outbox
from busd.protocol import FrameEncoder


class ServerState:
    """The server's settings, policy and op table; its open connections.

    A plain class, not a dataclass: busd's start is on the clock, and a
    dataclass costs about a millisecond to define.
    """

    __slots__ = ("connections", "encode", "ops", "outbox", "policy", "settings")

    def __init__(
        self,
        settings: ServerSettings,
        policy: AccessPolicy,
        ops: dict[str, Op],
        outbox: Outbox,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.ops = ops
        #: Gathers the writes of each loop turn (clients and workers).
        self.outbox = outbox
        #: Encodes every frame sent to clients (on the I/O loop only).
        self.encode = FrameEncoder()
        self.connections: set[Connection] = set()
