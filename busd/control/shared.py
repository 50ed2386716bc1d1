"""What the control server shares with each of its connections.

A connection is given this when it is made and reads today's settings and
policy from it (a reload replaces them here); it never reaches up to the
server itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from busd.control.access import AccessPolicy
from busd.control.requests import Connection, Op
from busd.control.settings import ServerSettings
from busd.outbox import Outbox
from busd.protocol import FrameEncoder


@dataclass
class ServerState:
    """The server's settings, policy and op table; its open connections."""

    settings: ServerSettings
    policy: AccessPolicy
    ops: dict[str, Op]
    #: Gathers the writes of each loop turn (clients and workers).
    outbox: Outbox
    #: Encodes every frame sent to clients (on the I/O loop only).
    encode: FrameEncoder = field(default_factory=FrameEncoder)
    connections: set[Connection] = field(default_factory=set)
