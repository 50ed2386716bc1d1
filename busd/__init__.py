"""busd: a process bus as a library (``busd.Bus``) and as a daemon (``busd``).

``busd.Bus`` is a drop-in for ``cherrypy.process.wspbus.Bus``; the plugins
that go with it live in ``busd.plugins``.
"""

from busd._version import __version__

__all__ = ["Bus", "ChannelFailures", "__version__", "states"]


def __getattr__(name: str) -> object:
    # Imported on first use so that ``busctl`` (which only needs the
    # version) starts without loading the bus and its threading machinery.
    if name in ("Bus", "ChannelFailures", "states"):
        from busd import bus

        return getattr(bus, name)
    raise AttributeError(f"module 'busd' has no attribute {name!r}")
