"""CherryPy-compatible module path: ``from busd import wspbus``.

Code written as ``from cherrypy.process import wspbus`` runs on busd by
changing that import only. Like CherryPy's module, this one offers a
ready-made process-wide ``bus``.
"""

from busd.bus import Bus, ChannelFailures, states

__all__ = ["Bus", "ChannelFailures", "bus", "states"]

#: The process-wide bus, as ``cherrypy.process.wspbus.bus``.
bus = Bus()
