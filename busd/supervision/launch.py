"""How a broker's worker process is started: its argv, environment, cwd
and owner, and the fork server that forks it.

``WorkerLauncher`` is the ``launch`` of ``PoolServices``: called with a
broker's config and an instance number, it asks the fork server
(busd/spawner.py) for a worker and returns its ``WorkerProcess``. A fork
server that dies before it answers is no failure of the broker's: the
same start is tried again on the next server (``ForkServers``).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from busd.config import BrokerConfig
from busd.principals import identity_of
from busd.protocol import ORIGINAL_PYTHONPATH
from busd.spawner import (
    ORPHAN_MARK,
    PACKAGE_ROOT,
    ForkServerGone,
    Spawner,
    WorkerProcess,
)
from busd.supervision.forkservers import ForkServers

#: How long one start waits for a working fork server before it fails.
LAUNCH_PATIENCE = 30.0


class WorkerLauncher:
    """Starts workers through a fork server, started (again) when needed."""

    def __init__(
        self, identity: str, base_dir: str | None, spawner: Spawner | None = None
    ) -> None:
        """``identity``: busd's socket path, the orphan mark its workers carry.

        ``base_dir``: where a broker's relative ``cwd`` starts (the config
        file's directory; None: the current directory). ``spawner``: a fork
        server ``busd run`` started already.
        """
        self.identity = identity
        self.base_dir = base_dir
        self.fork_servers = ForkServers(identity, spawner)

    def spawner(self) -> Spawner:
        """The fork server that starts the workers; started if need be."""
        return self.fork_servers.current()

    def fork_server_pid(self) -> int | None:
        """The fork server's PID while it runs (``busctl state``)."""
        return self.fork_servers.pid()

    def fork_server_state(self) -> dict[str, Any]:
        """The fork server's PID, restarts, last death, next start."""
        return self.fork_servers.state()

    def close(self) -> None:
        """Let the fork server go (on the I/O loop; its workers are stopped)."""
        self.fork_servers.close()

    def wait_closed(self) -> None:
        """Wait until the fork server has exited (main thread, at stop)."""
        self.fork_servers.wait_closed()

    def cwd(self, config: BrokerConfig) -> str:
        """The broker's working directory; relative to the config file's."""
        base = self.base_dir or os.getcwd()
        return os.path.normpath(os.path.join(base, config.cwd)) if config.cwd else base

    async def __call__(self, config: BrokerConfig, index: int) -> WorkerProcess:
        """Fork instance ``index`` of ``config``'s broker; return its process.

        Raises OSError when the fork server cannot start it (or none runs
        within ``LAUNCH_PATIENCE``), ValueError when the broker's ``user``
        is unknown. A fork server that dies first is replaced, and the
        start tried again: that is not this instance's failure.
        """
        name = f"{config.name}:{index}"
        argv = ["--broker", config.name, "--instance", str(index)]
        if config.handler:
            argv += ["--handler", config.handler]
        else:
            argv += ["--exec", "--", *(config.command or ())]
        env = self.environment(config, index)
        cwd = self.cwd(config)
        owner = None
        if config.user != "" and os.geteuid() == 0:
            who = identity_of(config.user, f"[brokers.{config.name}] user")
            owner = (who.uid, who.gid, list(who.groups))
        deadline = asyncio.get_running_loop().time() + LAUNCH_PATIENCE
        while True:
            spawner = await self.fork_servers.ready(deadline)
            try:
                return await spawner.spawn(argv, env, cwd, owner, name)
            except ForkServerGone:
                # ForkServers logs the death and starts the next; let the
                # loop run first (the death is seen there), never spin here.
                await asyncio.sleep(0)

    def environment(self, config: BrokerConfig, index: int) -> dict[str, str]:
        """The environment of instance ``index`` of ``config``'s broker.

        busd's own, the broker's ``env`` over it, the worker's identity, and
        a PYTHONPATH that finds busd's package (and, for a handler, the
        broker's ``cwd`` first). ``busd check-config`` imports handlers in it.
        """
        env = {
            **os.environ,
            **config.env,
            "BUSD_PID": str(os.getpid()),
            "BUSD_BROKER": config.name,
            "BUSD_INSTANCE": str(index),
            ORPHAN_MARK: self.identity,
        }
        cwd = self.cwd(config)
        # busd's own package must be importable by the worker wrapper; a
        # handler's module is imported relative to the broker's cwd, like a
        # script's. A command broker gets its own PYTHONPATH back before exec.
        own = env.get("PYTHONPATH", "")
        first = (cwd,) if config.handler else ()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (*first, PACKAGE_ROOT, own) if p)
        if not config.handler:
            env[ORIGINAL_PYTHONPATH] = own
        return env
