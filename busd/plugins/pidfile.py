"""A PID file that is also a lock: one running instance per path.

The file at ``path`` holds the PID as text, and its owner holds an
exclusive ``flock`` on it for as long as the process lives. The kernel
drops the lock when the process dies, however it dies, so a file nobody
has locked is *stale* and may be replaced; a locked one belongs to a live
process and is left alone.

Taking the file never shows a reader an empty or half-written file:

1. write our PID to a fresh temporary file in the same directory, lock
   it, fsync it;
2. ``link()`` it to ``path``: this creates ``path`` only if nothing is
   there, atomically; if it succeeds, we own the PID file;
3. if a file is there, open it and try to lock it. Locked by someone else:
   that process is running, stop with :class:`PIDFileError`. We got the
   lock: check that the inode we locked is still the one at ``path`` (a
   racing starter may have replaced it between our open and our lock) and
   start over if not; if it is, the file is stale and nobody else can lock
   it while we hold it, so ``rename()`` our temporary file over it.

Two starters racing on the same path therefore cannot both win: winning
means either creating ``path`` (only one ``link`` can) or renaming over a
stale inode whose lock only one of them can hold.

One cosmetic consequence of step 2: the descriptor holding the lock was
opened under the temporary name, so ``/proc/PID/fd`` and ``lsof`` show
that name, "(deleted)", although the inode is the one at ``path``.
(``renameat2(RENAME_NOREPLACE)`` would avoid it; Python has no binding.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import tempfile
import time
from typing import TYPE_CHECKING

from busd.plugins.base import SimplePlugin

if TYPE_CHECKING:
    from busd.bus import Bus

__all__ = ["PIDFile", "PIDFileError", "holder_of", "read_pid"]

# After daemonizing (65, so that the PID written is the daemon's, and the
# lock is not held by a parent about to exit) and before the control socket
# is bound (75): a second instance must fail before it touches the socket
# of the running one.
START_PRIORITY = 70

# Last of the exit listeners: the file (and its lock) says "busd is still
# running" until everything else has stopped, so a new instance cannot
# start while this one is still shutting its brokers down.
EXIT_PRIORITY = 90

MODE = 0o644

# How long a starter that finds the file locked but naming a dead process
# waits for the racer holding it to finish replacing it (see _take).
REPLACEMENT_GRACE_SECONDS = 1.0


class PIDFileError(RuntimeError):
    """The PID file could not be taken; ``pid`` names a running holder."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


def read_pid(path: str | os.PathLike[str]) -> int | None:
    """Return the PID written in the file at ``path``, or None.

    None when the file is missing, empty or not a number. This says nothing
    about whether that process still runs; see :meth:`PIDFile.holder`.
    """
    try:
        with open(path, "rb") as file:
            return _parse_pid(file.read(64))
    except FileNotFoundError:
        return None


class PIDFile(SimplePlugin):
    """Take the PID file at ``start`` and hold its lock until ``exit``.

    ``PIDFile(bus, pidfile)`` as in CherryPy; ``path=`` is busd's older name
    for the same argument. ``pidfile`` keeps the path as given, ``path`` is
    it made absolute (here, so that a later chdir does not move it), and
    ``finalized`` is True while this plugin holds the file.

    Unlike CherryPy's, which writes the file in place and removes it at exit
    whoever wrote it, the file is written atomically and locked (module
    docstring): a stale file (its process is gone) is replaced with an INFO
    log line; a live holder makes ``start`` raise :class:`PIDFileError`. At
    ``exit`` the file is removed if it is still ours; if removing is not
    allowed (say, after dropping privileges, in a directory only root may
    write) a warning is logged and the unlocked file stays behind, stale and
    harmless.
    """

    def __init__(
        self,
        bus: Bus,
        pidfile: str | os.PathLike[str] | None = None,
        *,
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(bus)
        if pidfile is None:
            pidfile = path
        elif path is not None:
            raise TypeError("PIDFile: give pidfile or path, not both")
        if pidfile is None:
            raise TypeError("PIDFile: missing the PID file's path (pidfile)")
        #: The path as given (CherryPy's attribute).
        self.pidfile = pidfile
        self.path = os.path.abspath(os.fspath(pidfile))
        #: True while this plugin holds the file (CherryPy's attribute).
        self.finalized = False
        self._fd: int | None = None
        self._pid: int | None = None

    @property
    def pid(self) -> int | None:
        """The PID we wrote while we hold the file, else None."""
        return self._pid if self._fd is not None else None

    def holder(self) -> int | None:
        """Return the PID of the live process holding the file, or None.

        None when there is no file or nobody holds its lock (stale). Our
        own process counts as a holder once ``start`` took the file.
        """
        return holder_of(self.path)

    # -- bus channels ---------------------------------------------------------

    def start(self) -> None:
        """Take the PID file, or raise PIDFileError if another process has it."""
        if self._fd is not None:
            self.bus.log(f"PID file {self.path} is already ours.", level=logging.DEBUG)
            return
        self._take()
        self.finalized = True
        self.bus.log(f"PID {self._pid} written to {self.path}.")

    start.priority = START_PRIORITY  # type: ignore[attr-defined]

    def exit(self) -> None:
        """Remove the file if it is still ours, then let go of the lock."""
        fd = self._fd
        if fd is None:
            return
        try:
            if _same_inode(fd, self.path):
                os.unlink(self.path)
            else:
                self.bus.log(
                    f"PID file {self.path} is no longer ours (replaced or "
                    "removed by someone else); leaving it alone.",
                    level=logging.WARNING,
                )
        except OSError as error:
            # Typically EACCES after dropping privileges: the directory is
            # root's. Not worth failing the exit for: the file is unlocked
            # from now on, so it is stale and the next start replaces it.
            self.bus.log(
                f"Could not remove PID file {self.path} ({error.strerror}); "
                "leaving it behind, unlocked.",
                level=logging.WARNING,
            )
        finally:
            self._fd = None
            self.finalized = False
            os.close(fd)  # releases the lock

    exit.priority = EXIT_PRIORITY  # type: ignore[attr-defined]

    # -- taking the file --------------------------------------------------------

    def _take(self) -> None:
        directory, name = os.path.split(self.path)
        pid = os.getpid()
        try:
            fd, temp_path = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
        except OSError as error:
            raise PIDFileError(
                f"cannot create PID file {self.path}: {error.strerror}"
            ) from error
        temp_linked = False  # True once temp_path is a second name of path
        try:
            os.fchmod(fd, MODE)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fresh inode: ours
            os.write(fd, f"{pid}\n".encode())
            os.fsync(fd)
            temp_linked = self._install(temp_path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_path)
            raise
        if temp_linked:
            os.unlink(temp_path)
        _fsync_directory(directory)
        self._fd = fd
        self._pid = pid

    def _install(self, temp_path: str) -> bool:
        """Make ``temp_path``'s inode the one at ``self.path``.

        Return True if it was linked (``temp_path`` is still a name of it),
        False if it was renamed over a stale file.
        """
        grace_deadline: float | None = None
        while True:
            try:
                os.link(temp_path, self.path)
                return True
            except FileExistsError:
                pass
            try:
                existing = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # removed since our link(): try creating it again
            try:
                try:
                    fcntl.flock(existing, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_fd(existing)
                    if not _same_inode(existing, self.path):
                        continue  # replaced meanwhile: look at the new one
                    if holder is None or not _process_exists(holder):
                        # Locked, yet naming no live process: another starter
                        # holds the stale file's lock for the instant it
                        # takes to rename its own over it. Give it that.
                        now = time.monotonic()
                        if grace_deadline is None:
                            grace_deadline = now + REPLACEMENT_GRACE_SECONDS
                        if now < grace_deadline:
                            time.sleep(0.005)
                            continue
                    shown = "unknown" if holder is None else holder
                    raise PIDFileError(
                        f"already running, PID {shown} (PID file {self.path})",
                        pid=holder,
                    ) from None
                if not _same_inode(existing, self.path):
                    continue  # we locked an inode that is no longer at path
                stale_pid = _read_fd(existing)
                os.rename(temp_path, self.path)
                why = (
                    "it held no valid PID"
                    if stale_pid is None
                    else f"PID {stale_pid} is no longer running"
                )
                self.bus.log(f"Replaced stale PID file {self.path} ({why}).")
                return False
            finally:
                os.close(existing)


def holder_of(path: str | os.PathLike[str]) -> int | None:
    """The PID of the live process holding the PID file at ``path``, or None.

    None when there is no file or nobody holds its lock (stale): the lock,
    not the number in the file, says whether that process still runs.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_fd(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _parse_pid(data: bytes) -> int | None:
    try:
        pid = int(data.strip())
    except ValueError:
        return None
    return pid if pid > 0 else None


def _read_fd(fd: int) -> int | None:
    return _parse_pid(os.pread(fd, 64, 0))


def _same_inode(fd: int, path: str) -> bool:
    """True if ``path`` currently names the file open on ``fd``."""
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (at_path.st_dev, at_path.st_ino)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _fsync_directory(directory: str) -> None:
    """Make the new directory entry durable (best effort: not all fs can)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EBADF, errno.EROFS):
            raise
    finally:
        os.close(fd)
