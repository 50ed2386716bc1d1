"""The control ops busd answers: what each takes, checks and returns.

One function per op, grouped by subject: ``messages`` (publish,
subscribe), ``brokers`` (start, stop, restart, scale), ``watch`` (events,
logs, cancel), ``admin`` (hello, ping, state, reload, shutdown), ``dead``
(the dead letters: list, show, replay, drop); ``args``
holds the argument checks they share. Each op is ``op(services, ctx,
args)``, run on the I/O loop: ``services`` (``OpServices``) is what it may
use, ``ctx`` the request, ``args`` the request's keys besides ``id`` and
``op``. Arguments are checked before anything happens, and a wrong one is
a ``bad_request`` naming it. Ops that change the bus (``reload``,
``shutdown``) hand the change to the main thread and answer at once. The
list, with examples, is docs/protocol.md.
"""

from __future__ import annotations

from functools import partial

from busd.control.access import READ, WRITE
from busd.control.requests import Op
from busd.ops import admin, brokers, dead, messages, watch
from busd.ops.services import OpServices

__all__ = ["OpServices", "build_ops"]


def build_ops(services: OpServices) -> dict[str, Op]:
    """The op table: name -> Op(handler, access, stream)."""
    table = {
        "ping": Op(partial(admin.ping, services), READ),
        "state": Op(partial(admin.state, services), READ),
        "publish": Op(partial(messages.publish, services), WRITE),
        "subscribe": Op(partial(messages.subscribe, services), READ, stream=True),
        "events": Op(partial(watch.events, services), READ, stream=True),
        "logs": Op(partial(watch.logs, services), READ, stream=True),
        "cancel": Op(partial(watch.cancel, services), READ),
        "broker_start": Op(partial(brokers.lifecycle("start"), services), WRITE),
        "broker_stop": Op(partial(brokers.lifecycle("stop"), services), WRITE),
        "broker_restart": Op(partial(brokers.lifecycle("restart"), services), WRITE),
        "scale": Op(partial(brokers.scale, services), WRITE),
        "reload": Op(partial(admin.reload, services), WRITE),
        "shutdown": Op(partial(admin.shutdown, services), WRITE),
        "dead_list": Op(partial(dead.dead_list, services), READ),
        "dead_show": Op(partial(dead.dead_show, services), READ),
        "dead_replay": Op(partial(dead.dead_replay, services), WRITE),
        "dead_drop": Op(partial(dead.dead_drop, services), WRITE),
    }
    names = sorted([*table, "hello"])
    table["hello"] = Op(partial(admin.hello, names, services), READ)
    return table
