"""What the ops are given: the parts of busd they read and drive."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from busd.events import EventHub
from busd.ioloop import IOLoop
from busd.logs import LogRing
from busd.report import Report
from busd.router import Router
from busd.supervision.supervisor import Supervisor


class OpServices(NamedTuple):
    """Everything an op may use; built once by the daemon."""

    router: Router
    supervisor: Supervisor
    report: Report
    events: EventHub
    ring: LogRing
    ioloop: IOLoop
    #: The bus's state name now ("STARTED"...).
    bus_state: Callable[[], str]
    #: True once an exit was requested or has begun (``hello`` says so).
    stopping: Callable[[], bool]
    #: Reads the config file as a reload would; raises ConfigError or
    #: ValueError naming what is wrong, applies nothing.
    check_reload: Callable[[], object]
    #: Asks the main thread for ``exit`` or ``graceful``: (action, reason).
    request_main_thread: Callable[[str, str], None]
