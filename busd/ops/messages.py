"""The message ops: ``publish`` a message, ``subscribe`` to channels."""

from __future__ import annotations

from typing import Any

from busd.control.requests import Pending, RequestContext
from busd.ops import args as check
from busd.ops.services import OpServices
from busd.protocol import ErrorCode, ProtocolError


def publish(services: OpServices, ctx: RequestContext, args: dict[str, Any]) -> Any:
    """Accept a message on a channel; with ``wait``, answer once it is settled.

    The answer comes from the router; with ``wait`` it is a Pending, not a
    coroutine: answered on the last route's outcome, with no Task for each
    publish --wait.
    """
    check.only(args, "publish", "channel", "message", "wait")
    channel = check.channel(args.get("channel"), "publish")
    if "message" not in args:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'publish' needs a 'message'")
    wait = check.boolean(args, "publish", "wait")
    if not wait:
        return services.router.publish(channel, args["message"])
    pending = Pending()
    result = services.router.publish(channel, args["message"], pending.resolve)
    if result["brokers"] == 0:  # no route took it: nothing to wait for
        return {**result, "acked": 0, "dead": 0}
    pending.finish = lambda outcomes: {**result, **outcomes}
    return pending


def subscribe(
    services: OpServices, ctx: RequestContext, args: dict[str, Any]
) -> dict[str, Any]:
    """Stream every message published on the given channels."""
    check.only(args, "subscribe", "channels")
    channels = args.get("channels")
    if not isinstance(channels, list) or not channels:
        raise check.bad("subscribe", "channels", "a non-empty list of names", channels)
    names = [check.channel(c, "subscribe") for c in channels]
    router = services.router

    def deliver(channel: str, message: Any) -> None:
        ctx.emit({"channel": channel, "message": message})

    for name in names:
        router.subscribe(name, deliver)

    def unsubscribe() -> None:
        for name in names:
            router.unsubscribe(name, deliver)

    ctx.open_stream(unsubscribe)
    return {"channels": names}
