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

_MODULES = {
    "SimplePlugin": "base",
    "Daemonizer": "daemonize",
    "PIDFile": "pidfile",
    "PIDFileError": "pidfile",
    "DropPrivileges": "privileges",
    "SdNotify": "sdnotify",
    "SignalHandler": "signals",
    "BackgroundTask": "tasks",
    "Monitor": "tasks",
    "ThreadManager": "threads",
}

__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'busd.plugins' has no attribute {name!r}")
    return getattr(import_module(f"busd.plugins.{module}"), name)
