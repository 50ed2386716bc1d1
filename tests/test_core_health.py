"""Health in-process: which instances make busd degraded, and how busctl says it.

Real brokers and instances over fake worker processes (tests/core_fakes.py),
read by the real ``Report`` (busd/report.py); its rows and health summary
are rendered by busctl's own ``render_state`` (busctl/render.py), as
``busctl state`` prints them.
"""

from __future__ import annotations

import asyncio
import re
import time
import types
from typing import Any

from core_fakes import FAST, Harness, broker_config, run, wait_until

from busctl.render import render_state
from busd.config import Restart
from busd.report import Report
from busd.supervision.broker import Broker
from busd.supervision.forkservers import ForkServers
from busd.supervision.states import InstanceState

S = InstanceState


def report_of(*brokers: Broker) -> Report:
    """A Report over ``brokers`` (health and rows read nothing else)."""
    supervisor = types.SimpleNamespace(brokers={b.name: b for b in brokers})
    return Report(None, None, supervisor, None, lambda: 0, None, "/s")  # type: ignore[arg-type]


def state_text(report: Report) -> str:
    """``busctl state``'s text for what ``report`` says of its brokers."""
    supervisor: Any = report.supervisor
    state = {
        "state": "STARTED",
        "pid": 1,
        "health": report.health(),
        "brokers": {n: report.broker(b) for n, b in supervisor.brokers.items()},
    }
    return render_state(state, "/s")


def test_health_asks_every_wanted_instance_to_be_running() -> None:
    async def scenario(h: Harness) -> None:
        h.launcher.auto_exit = False
        h.services = h.services._replace(timing=FAST._replace(backoff_first=10.0))
        orders = await h.running_broker(
            broker_config("orders", instances=2, backoff_max=10.0, start_retries=1)
        )
        once = await h.running_broker(broker_config("once", restart=Restart.NEVER))
        report = report_of(orders, once)
        assert report.health() == {"status": "healthy", "reasons": []}
        assert "    Health: healthy\n" in state_text(report)

        # A worker that did its job and left (status 0 under "never"): done.
        h.launcher.current("once", 0).exit(0)
        await wait_until(lambda: once.instances[0].state is S.STOPPED, "STOPPED")
        assert report.health()["status"] == "healthy"

        # A crash: BACKOFF, a restart is due in 10 s.
        first, second = orders.instances
        h.process(first).exit(1)
        await wait_until(lambda: first.state is S.BACKOFF, "BACKOFF")
        assert report.health() == {
            "status": "degraded",
            "reasons": ["orders:0 BACKOFF (1 failed start)"],
        }
        row = report.instance(first)
        assert (row["failures"], row["exit_cause"], row["should_run"]) == (
            1,
            "exit status 1 after 0.0 s running",
            True,
        )
        assert 9 < row["next_try"] <= 10
        text = state_text(report)
        assert "    Health: degraded - orders:0 BACKOFF (1 failed start)\n" in text
        assert re.search(
            r"^  orders:0  BACKOFF   1 failed start, next try in (9\.\d|10\.0)s, "
            r"last exit: exit status 1 after 0\.0 s running  restarts 0  ",
            text,
            re.MULTILINE,
        ), text

        # The restart comes (early here: the timer's own start): it is
        # STARTING until ready.
        await first.start()
        assert report.health()["reasons"] == ["orders:0 STARTING"]
        h.process(first).exit(1)  # before ready: the second failed start
        await wait_until(lambda: first.state is S.FATAL, "FATAL")
        assert report.instance(first)["next_try"] is None
        text = state_text(report)
        assert "    Health: degraded - orders:0 FATAL (2 failed starts)\n" in text
        assert re.search(
            r"^  orders:0  FATAL     2 failed starts \(start_retries 1\), "
            r"last exit: exit status 1 before it was ready  restarts 0  ",
            text,
            re.MULTILINE,
        ), text

        # Stopped on purpose: not missed, FATAL or not.
        stop = asyncio.create_task(orders.stop())
        await wait_until(lambda: second.state is S.STOPPING, "STOPPING")
        h.process(second).exit(0)
        await stop
        assert report.health() == {"status": "healthy", "reasons": []}
        assert [report.instance(i)["should_run"] for i in orders.instances] == [
            False,
            False,
        ]

        # A failure under "never": stopped for good, but still wanted.
        await once.start()
        h.launcher.current("once", 0).exit(2)
        await wait_until(lambda: once.instances[0].state is S.STOPPED, "STOPPED")
        reason = "once:0 STOPPED (exit status 2 before it was ready; restart = never)"
        assert report.health() == {"status": "degraded", "reasons": [reason]}
        assert re.search(
            r"^  once:0    STOPPED   last exit: exit status 2 before it was ready, "
            r"not restarted  restarts 0  ",
            state_text(report),
            re.MULTILINE,
        ), state_text(report)

    run(scenario)


def test_the_health_line_names_four_instances_and_counts_the_rest() -> None:
    async def scenario(h: Harness) -> None:
        broker = Broker(broker_config("b", instances=6), h.services)
        await broker.scale(6)  # each STARTING
        text = state_text(report_of(broker))
        assert (
            "    Health: degraded - b:0 STARTING, b:1 STARTING, b:2 STARTING, "
            "b:3 STARTING and 2 more\n"
        ) in text
        await broker.stop()

    run(scenario)


def test_the_main_pid_line_says_how_the_fork_server_fares() -> None:
    servers = ForkServers("/s")  # none started: its state is all there is

    def main_pid_line(fork_server: int | None) -> str:
        state = {
            "state": "STARTED",
            "pid": 1,
            "fork_server": fork_server,
            "fork_server_health": servers.state(),
        }
        [line] = [t for t in render_state(state, "/s").splitlines() if "Main PID" in t]
        return line

    assert main_pid_line(None) == "  Main PID: 1 (uid None, gid None)"
    assert main_pid_line(42).endswith("; fork server PID 42")
    servers.restarts, servers.last_exit = 2, "killed by SIGKILL after 3s"
    assert main_pid_line(43).endswith(
        "; fork server PID 43 (restarted 2x, last: killed by SIGKILL after 3s)"
    )
    servers.next_start = time.time() + 5
    line = main_pid_line(None)
    assert re.search(
        r"; fork server restarting in [45]\.\ds \(last: killed by SIGKILL after 3s\)$",
        line,
    ), line
