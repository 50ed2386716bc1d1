"""Plugins for ``busd.Bus``: one file each, each a class with subscribe().

Importing this package loads nothing more than its names: each plugin's
module is imported on first use, so a process that needs only
``SimplePlugin`` does not pay for python-daemon or the others.
"""

from __future__ import annotations

from importlib import import_module

# typing costs every worker's start a few ms; annotations don't need it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    # What __getattr__ below returns, for the type checker only.
    from busd.plugins.autoreload import Autoreloader as Autoreloader
    from busd.plugins.base import SimplePlugin as SimplePlugin
    from busd.plugins.daemonize import Daemonizer as Daemonizer
    from busd.plugins.pidfile import PIDFile as PIDFile
    from busd.plugins.pidfile import PIDFileError as PIDFileError
    from busd.plugins.privileges import DropPrivileges as DropPrivileges
    from busd.plugins.sdnotify import SdNotify as SdNotify
    from busd.plugins.signals import SignalHandler as SignalHandler
    from busd.plugins.tasks import BackgroundTask as BackgroundTask
    from busd.plugins.tasks import Monitor as Monitor
    from busd.plugins.tasks import PerpetualTimer as PerpetualTimer
    from busd.plugins.threads import ThreadManager as ThreadManager

_MODULES = {
    "Autoreloader": "autoreload",
    "SimplePlugin": "base",
    "Daemonizer": "daemonize",
    "PIDFile": "pidfile",
    "PIDFileError": "pidfile",
    "DropPrivileges": "privileges",
    "SdNotify": "sdnotify",
    "SignalHandler": "signals",
    "BackgroundTask": "tasks",
    "Monitor": "tasks",
    "PerpetualTimer": "tasks",
    "ThreadManager": "threads",
}

__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'busd.plugins' has no attribute {name!r}")
    return getattr(import_module(f"busd.plugins.{module}"), name)
