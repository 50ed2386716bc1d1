"""The broker ops: start, stop, restart a broker's instances; scale it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from busd.control.requests import RequestContext
from busd.ops import args as check
from busd.ops.services import OpServices

log = logging.getLogger("busd")

#: The most instances ``scale`` runs of one broker.
MAX_INSTANCES = 256

BrokerOp = Callable[
    [OpServices, RequestContext, dict[str, Any]],
    Coroutine[Any, Any, dict[str, Any]],
]


def lifecycle(action: str) -> BrokerOp:
    """The op ``broker_<action>``: start, stop or restart instances."""
    op_name = f"broker_{action}"

    async def op(
        services: OpServices, ctx: RequestContext, args: dict[str, Any]
    ) -> dict[str, Any]:
        check.only(args, op_name, "broker", "instance")
        broker, index = check.broker_target(services.supervisor, op_name, args)
        target = broker.name if index is None else f"{broker.name}:{index}"
        log.info("%s %s requested by %s", op_name, target, ctx.peer)
        targets = broker.select(index)
        await getattr(broker, action)(index)
        # Answer once the instances are RUNNING or have failed, as scale
        # does: a start that answered at STARTING would say nothing.
        await services.supervisor.wait_settled(targets)
        return services.report.broker(broker)

    op.__doc__ = f"The ``{op_name}`` op."
    return op


async def scale(
    services: OpServices, ctx: RequestContext, args: dict[str, Any]
) -> dict[str, Any]:
    """Run as many instances of a broker as asked."""
    check.only(args, "scale", "broker", "instances")
    broker, _ = check.broker_target(services.supervisor, "scale", args)
    count = check.whole_number(
        args.get("instances"), "scale", "instances", 0, MAX_INSTANCES
    )
    log.info("Scale %s to %d requested by %s", broker.name, count, ctx.peer)
    await broker.scale(count)
    await services.supervisor.wait_settled(broker.instances)
    return services.report.broker(broker)
