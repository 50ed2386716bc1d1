"""Re-execute the process when its source files change: the Autoreloader plugin.

A development aid, as CherryPy's plugin of the same name (same arguments,
attributes, log lines and priority): a :class:`~busd.plugins.tasks.Monitor`
that every ``frequency`` seconds looks at the modification time of the file
of each imported module whose name matches ``match``, plus the paths in
``files``. The first look only notes the times; when a file is newer than
noted, or gone, it logs ``Restarting because PATH changed.`` and calls
``bus.restart()``: the bus exits and ``block()`` re-executes the process.
"""

from __future__ import annotations

import os
import re
import sys
from types import ModuleType
from typing import TYPE_CHECKING

from busd.plugins.tasks import MONITOR_START_PRIORITY, Monitor

if TYPE_CHECKING:
    from busd.bus import Bus

__all__ = ["Autoreloader"]

# Module paths in sys.modules may be relative (the script that was started,
# an entry of sys.path such as ""), meaning relative to the directory the
# process started in. The application may chdir later, so they are made
# absolute against the directory of the time this module was imported.
_START_DIRECTORY = os.getcwd()


def _module_file(module: ModuleType | None) -> str | None:
    """The file a module was loaded from: its zip archive, or its ``__file__``."""
    if module is None:
        return None
    archive = getattr(getattr(module, "__loader__", None), "archive", None)
    if isinstance(archive, str) and archive:
        return archive
    filename = getattr(module, "__file__", None)
    if not isinstance(filename, str) or not filename:
        return None
    return os.path.normpath(os.path.join(_START_DIRECTORY, filename))


class Autoreloader(Monitor):
    """A :class:`Monitor` that restarts the process when watched files change.

    ``files`` is a set of extra paths to watch; ``match`` a regular
    expression that a module's name must match (``re.match``, from its
    start) for its file to be watched; ``mtimes`` the times last seen
    (``None`` for a file that did not exist when first seen, which is then
    never watched). The thread is named ``Autoreloader``.
    """

    def __init__(self, bus: Bus, frequency: float = 1, match: str = ".*") -> None:
        #: {path: modification time when first seen, or None}.
        self.mtimes: dict[str, float | None] = {}
        #: Extra paths to watch besides the imported modules' files.
        self.files: set[str] = set()
        #: Regular expression the names of watched modules match.
        self.match = match
        super().__init__(bus, self.run, frequency)

    def start(self) -> None:
        """Start watching; a fresh start (no thread) forgets the times seen."""
        if self.thread is None:
            self.mtimes = {}
        super().start()

    start.priority = MONITOR_START_PRIORITY  # type: ignore[attr-defined]

    def sysfiles(self) -> set[str]:
        """The files of the imported modules whose names match ``match``."""
        pattern = re.compile(self.match)
        found = set()
        for name in list(sys.modules):
            if pattern.match(name):
                filename = _module_file(sys.modules.get(name))
                if filename:
                    found.add(filename)
        return found

    def run(self) -> None:
        """Look at every watched file once; restart the bus on a change."""
        for filename in self.sysfiles() | self.files:
            if not filename:
                continue
            if filename.endswith(".pyc"):
                filename = filename[:-1]  # watch the source
            if filename in self.mtimes and self.mtimes[filename] is None:
                continue  # no such file when first seen (a built-in, say)
            try:
                mtime: float | None = os.stat(filename).st_mtime
            except OSError:
                mtime = None
            if filename not in self.mtimes:
                self.mtimes[filename] = mtime
                continue
            seen = self.mtimes[filename]
            if mtime is None or (seen is not None and mtime > seen):
                self.bus.log(f"Restarting because {filename} changed.")
                thread = self.thread
                if thread is not None:
                    thread.cancel()
                    self.bus.log(f"Stopped thread {thread.name!r}.")
                self.bus.restart()
                return
