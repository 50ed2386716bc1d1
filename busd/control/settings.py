"""What the control server needs from the configuration."""

from __future__ import annotations

from typing import NamedTuple

from busd.config import Config
from busd.principals import gid_of


class ServerSettings(NamedTuple):
    """What the control server needs from the configuration."""

    path: str
    mode: int = 0o660
    gid: int = -1
    max_frame: int = 1 << 20
    max_clients: int = 1024
    # A client that sends part of a frame then goes quiet this long is cut off.
    frame_timeout: float = 10.0
    # Unsent bytes to a client before it is cut off as a hopeless reader.
    max_output: int = 8 << 20


def server_settings(config: Config) -> ServerSettings:
    """The control server's settings from ``config`` (group names resolved).

    Raises ValueError naming ``[busd] group`` if that group is unknown.
    """
    settings = config.busd
    return ServerSettings(
        path=settings.socket,
        mode=settings.socket_mode,
        gid=gid_of(settings.group, "[busd] group") if settings.group != "" else -1,
        max_frame=settings.max_frame,
        max_clients=settings.max_clients,
        frame_timeout=settings.frame_timeout,
        max_output=settings.max_output,
    )
