"""Append-only files of msgpack frames: how the spool and the dead letters
are read and written.

A record file is a sequence of frames in the wire format (4-byte length,
then a msgpack map). The rules for reading one at start are the same for
every such file, so they live here once:

- a torn last frame (busd died mid-write) is ignored, with a warning;
- a record its owner does not recognise (``apply`` raises ValueError) is
  skipped: its length still leads to the next one;
- a header no record can have (over ``MAX_RECORD``, or a torn body that
  does not start like a map) ends the reading there: what came before is
  kept;
- a damaged file is copied aside (``NAME.damaged-TIME``) before its owner
  rewrites it, so what could not be read is not destroyed.

Writing: a record cut short by an error is taken back out (it would
garble every record after it), and a rewrite goes to a new file, fsynced,
renamed over the old one: a crash leaves one or the other.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from typing import Any

from busd.protocol import HEADER, ProtocolError, decode_body

log = logging.getLogger("busd")

# A header announcing more than this is damage, not a record.
MAX_RECORD = 1 << 31


def read_records(
    path: str, label: str, apply: Callable[[dict[str, Any]], None]
) -> bool:
    """Hand each record of ``path`` to ``apply``; True if the file was damaged.

    ``label`` names the file in log lines ("Spool", "Dead-letter file").
    ``apply`` raises ValueError for a record that is not one of its own.
    A missing file holds no records.
    """
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return False
    # Frame by frame, so that damage keeps what comes before it: a header
    # no record can have stops the reading there; a record that is not one
    # of ours is skipped (its length still leads to the next).
    damaged = False
    start, end = 0, len(data)
    while end - start >= HEADER.size:
        (length,) = HEADER.unpack_from(data, start)
        body_start = start + HEADER.size
        torn = end - body_start < length
        # Every record is a small map: a torn one starts like one too.
        if length > MAX_RECORD or (
            torn and body_start < end and data[body_start] & 0xF0 != 0x80
        ):
            log.error(
                "%s %s is unreadable from byte %d on (a record of %d bytes "
                "announced, %d bytes left); the records before it are kept",
                label,
                path,
                start,
                length,
                end - body_start,
            )
            damaged = True
            start = end
            break
        if torn:
            break  # busd died while writing the last record
        try:
            apply(decode_body(data[body_start : body_start + length]))
        except (ProtocolError, ValueError) as error:
            log.warning("%s %s: unreadable record skipped: %s", label, path, error)
            damaged = True
        start = body_start + length
    if start < end:
        log.warning(
            "%s %s ends with a torn record (%d bytes; busd died while "
            "writing it): ignored",
            label,
            path,
            end - start,
        )
    if damaged:
        keep_damaged_copy(path, label)
    return damaged


def keep_damaged_copy(path: str, label: str) -> None:
    """Copy a damaged file aside before it is rewritten."""
    copy = f"{path}.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
    try:
        shutil.copyfile(path, copy)
    except OSError as error:
        log.error(
            "%s %s: cannot keep a copy of the damaged file: %s",
            label,
            path,
            error.strerror or error,
        )
        return
    log.error("%s %s was damaged; the file as it was is kept as %s", label, path, copy)


def write_all(fd: int, data: bytes) -> None:
    """Append ``data`` to ``fd``; on an error, take the partial bytes back out.

    Raises the OSError.
    """
    size = os.fstat(fd).st_size
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except OSError:
        # A record cut short would garble every record after it.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise


def replace(path: str, frames: Iterable[bytes], label: str) -> bool:
    """Rewrite ``path`` as ``frames``: a new file, fsynced, renamed over it.

    False (and a warning) when the disk does not let us: the file is then
    as it was.
    """
    temporary = path + ".new"
    try:
        # The file's own mode, not open()'s 0o666: this file becomes it.
        with os.fdopen(
            os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640), "wb"
        ) as file:
            for frame in frames:
                file.write(frame)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        log.warning(
            "%s %s: cannot compact it (%s); keeping it as it is",
            label,
            path,
            error.strerror or error,
        )
        return False
    # Renamed: the new file is the one to append to now, even if the
    # rename's own durability cannot be made sure of.
    try:
        directory = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as error:
        log.warning(
            "%s %s: cannot sync its directory after compacting it: %s",
            label,
            path,
            error.strerror or error,
        )
    return True
