"""A throw-away real systemd for tests: a thin Python face on ``tests/sdharness``.

``tests/sdharness`` (a copy of the shared tool, see its header) boots the
machine's own systemd as PID 1 of fresh pid/mount/net/... namespaces over a
read-only view of ``/``, with private ``/etc``, ``/var``, ``/run`` and
``/tmp``; ``/run/harness`` inside is :attr:`Instance.share` outside. This
module boots one, runs commands in it, and always tears it down::

    with booted("busd") as systemd:
        systemd.install(text, "/etc/systemd/system/x.service")
        systemd.systemctl("start", "x")

:func:`unavailable` says why the machine cannot do it (not root, no
systemd, no cgroup2, ...), for a clear ``pytest.skip``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

HARNESS = Path(__file__).resolve().parent / "sdharness"
BASE = Path(os.environ.get("SDHARNESS_BASE", "/tmp/systemd-harness"))
SYSTEMD = Path("/lib/systemd/systemd")
TOOLS = ("unshare", "nsenter", "setpriv", "script", "systemctl", "journalctl")


def unavailable() -> str | None:
    """Why no instance can boot here, or None when it can."""
    if os.geteuid() != 0:
        return "booting a systemd instance needs root"
    if not SYSTEMD.exists():
        return f"no systemd on this machine ({SYSTEMD} is missing)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing tools for sdharness: {', '.join(missing)}"
    with open("/proc/self/mountinfo") as mounts:
        if not any(" - cgroup2 " in line for line in mounts):
            return "no cgroup2 hierarchy mounted"
    return None


class Instance:
    """One running systemd instance, driven through ``sdharness exec``."""

    def __init__(self, name: str) -> None:
        self.name = name
        #: The host folder seen as /run/harness inside.
        self.share = BASE / "run" / name / "share"

    def run(
        self, *command: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` inside (as root, in every namespace of the instance)."""
        result = subprocess.run(
            [str(HARNESS), "exec", self.name, *command],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def systemctl(
        self, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``systemctl ARGS`` inside."""
        return self.run("systemctl", "--no-pager", *args, check=check)

    def props(self, unit: str, *names: str) -> dict[str, str]:
        """Properties of ``unit`` from ``systemctl show``, as strings."""
        out = self.systemctl("show", unit, *(f"--property={n}" for n in names))
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if line)

    def journal(self, unit: str) -> str:
        """The journal of ``unit``, messages only."""
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit).stdout

    def install(self, text: str, path: str, mode: str = "644") -> None:
        """Write ``text`` to ``path`` inside (root-owned, parents created)."""
        staged = self.share / f"staged-{uuid.uuid4().hex[:8]}"
        staged.write_text(text)
        try:
            self.run("install", "-D", f"-m{mode}", f"/run/harness/{staged.name}", path)
        finally:
            staged.unlink()


@contextlib.contextmanager
def booted(prefix: str, bind_read_only: Iterable[str] = ()) -> Iterator[Instance]:
    """Boot an instance named ``PREFIX-<random>``; tear it down at the end.

    ``bind_read_only``: host directories to show read-only inside at the
    same path (for a checkout under /tmp or on another filesystem).
    """
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "SDHARNESS_BIND_RO": ":".join(bind_read_only)}
    try:
        subprocess.run(
            [str(HARNESS), "up", name],
            check=True,
            timeout=120,
            env=env,
            capture_output=True,
            text=True,
        )
    except subprocess.CalledProcessError as error:
        raise AssertionError(
            f"sdharness up failed:\n{error.stdout}\n{error.stderr}"
        ) from None
    try:
        yield Instance(name)
    finally:
        subprocess.run(
            [str(HARNESS), "down", name], check=False, timeout=120, capture_output=True
        )
