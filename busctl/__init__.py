"""busctl: the command line and Python client for the busd daemon.

``from busctl import Client`` gives the client (see docs/client.md).
"""

__all__ = ["BusError", "Client", "ClientError", "DaemonUnavailable", "Timeout"]


def __getattr__(name: str) -> object:
    # Lazy, so that ``busctl --help`` does not load msgpack and sockets.
    if name in __all__:
        from busctl import client

        return getattr(client, name)
    raise AttributeError(f"module 'busctl' has no attribute {name!r}")
