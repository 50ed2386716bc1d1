"""Make CherryPy run on busd's bus and plugins, in every process that imports it.

tests/test_cherrypy_states.py puts this directory first on PYTHONPATH, so
Python imports this module at start-up in the pytest process that runs
CherryPy's own test_states.py and in every child that test starts (its
demo servers, their daemonized and re-executed forms), which inherit the
environment.

CherryPy makes ``cherrypy.engine`` while ``cherrypy`` is imported, from the
module global ``cherrypy.process.wspbus.bus``, and builds its plugins from
the classes of ``cherrypy.process.plugins``. A finder placed first on
``sys.meta_path`` lets those two modules load as usual, then replaces, before
anyone else sees them, the bus by a ``busd.Bus`` and the plugin classes
named in ``BUSD_CHERRYPY_PLUGINS`` (comma-separated) by busd's, when
``BUSD_CHERRYPY_BUS`` is ``busd``.

Whatever the mode, each process appends one JSON line per module to the file
named by ``BUSD_CHERRYPY_RECORD``: its PID and the classes it ended up with,
so the harness can check that the substitution (or its absence, for the
reference run) reached every process.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys

_ON_BUSD = os.environ.get("BUSD_CHERRYPY_BUS") == "busd"
_PLUGINS = [
    name for name in os.environ.get("BUSD_CHERRYPY_PLUGINS", "").split(",") if name
]
_RECORD = os.environ.get("BUSD_CHERRYPY_RECORD")


def _qualname(obj):
    return f"{obj.__module__}.{obj.__qualname__}"


def _record(what, classes):
    if not _RECORD:
        return
    line = json.dumps({"pid": os.getpid(), "module": what, "classes": classes})
    # One short append per line: lines of concurrent processes never mix.
    with open(_RECORD, "a", encoding="utf-8") as record:
        record.write(line + "\n")


def _after_wspbus(module):
    if _ON_BUSD:
        import busd

        module.bus = busd.Bus()
    _record("wspbus", {"bus": _qualname(type(module.bus))})


def _after_plugins(module):
    if _ON_BUSD:
        from busd import plugins

        for name in _PLUGINS:
            setattr(module, name, getattr(plugins, name))
    names = _PLUGINS or ["SignalHandler"]
    _record("plugins", {name: _qualname(getattr(module, name)) for name in names})


_PATCHES = {
    "cherrypy.process.wspbus": _after_wspbus,
    "cherrypy.process.plugins": _after_plugins,
}


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then the patch for that module."""

    def __init__(self, loader, patch):
        self._loader = loader
        self._patch = patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._patch(module)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    """Finds the modules to patch with the ordinary finders, wraps their loader."""

    def find_spec(self, fullname, path, target=None):
        patch = _PATCHES.get(fullname)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader, patch)
        return spec


sys.meta_path.insert(0, _PatchingFinder())
