"""Plugins for ``busd.Bus``: one file each, each a class with subscribe()."""

from busd.plugins.base import SimplePlugin

__all__ = ["SimplePlugin"]
