"""Shared fixtures: a real busd daemon on a temporary socket.

``busd_daemon`` starts ``python -m busd run`` as a subprocess with a config
file in a temp directory, waits (with a deadline) until it answers ping,
and at the end stops it by its PID: SIGTERM, then SIGKILL if it lingers.
``orders`` is one with examples/stock.py's OrderBroker, two instances.

Only fixtures live here; the plain helpers they are built from
(``RunningDaemon``, ``start_daemon``, ``wait_for``...) are in helpers.py,
where test modules import them from.

Every test that asks for one of those daemon fixtures is marked ``daemon``
(``pytest -m "not daemon"`` runs the in-process ones: scripts/mutate does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from helpers import ORDERS, RunningDaemon, instance_pids, record_log, start_daemon

from busd import Bus

#: The fixtures that start a real busd; a test using one is marked ``daemon``.
DAEMON_FIXTURES = frozenset({"start_busd", "busd_daemon", "orders"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if DAEMON_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.daemon)


@pytest.fixture
def start_busd(tmp_path: Path) -> Iterator[Callable[..., RunningDaemon]]:
    """A factory: ``start_busd(config_text="", wait=True, env=None)``."""
    started: list[RunningDaemon] = []

    def start(
        config_text: str = "", wait: bool = True, env: dict[str, str] | None = None
    ) -> RunningDaemon:
        daemon = start_daemon(tmp_path / f"busd{len(started)}", config_text, wait, env)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


@pytest.fixture
def busd_daemon(start_busd: Callable[..., RunningDaemon]) -> RunningDaemon:
    """One running busd with the default settings."""
    return start_busd()


@pytest.fixture
def orders(start_busd) -> Iterator[RunningDaemon]:
    """busd with the ``orders`` broker; at the end, busd and its workers gone."""
    daemon = start_busd(config_text=ORDERS)
    yield daemon
    workers = [psutil.Process(pid) for pid in instance_pids(daemon).values()]
    assert daemon.stop() == 0, daemon.log_text()
    _, alive = psutil.wait_procs(workers, timeout=10)
    for process in alive:
        process.kill()
    assert not alive, f"workers outlived busd: {alive}"


@pytest.fixture
def bus_log() -> tuple[Bus, list[tuple[str, int]]]:
    """A new Bus (not started) and the (message, level) pairs it logs."""
    bus = Bus()
    return bus, record_log(bus)
