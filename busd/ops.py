"""The control ops busd answers: what each takes, checks and returns.

Each op is a function ``op(ctx, args)`` run on the I/O loop; it returns its
result, or when it must wait a coroutine (broker lifecycle) or a
``Pending`` (publish --wait, answered without a Task). ``args`` are
the request's keys besides ``id`` and ``op``. Arguments are checked before
anything happens, and a wrong one is a ``bad_request`` naming it. Ops that
change the bus (``reload``, ``shutdown``) hand the change to the main
thread and answer at once. The list, with examples, is docs/protocol.md.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from busd._version import __version__
from busd.config import ConfigError
from busd.control import READ, WRITE, Op, RequestContext
from busd.protocol import PROTOCOL_VERSION, ErrorCode, ProtocolError

if TYPE_CHECKING:
    from busd.daemon import Daemon

log = logging.getLogger("busd")

MAX_CHANNEL_LENGTH = 128
MAX_LOG_LINES = 10_000
# A logs answer stays under every client's default largest frame (1 MiB):
# the newest lines that fit are sent, and the rest counted ("left_out").
LOGS_ANSWER_BYTES = 768 * 1024
# What an entry's fields besides its text take, at most, encoded.
LOG_ENTRY_OVERHEAD = 200


def build_ops(daemon: Daemon) -> dict[str, Op]:
    """The op table for ``daemon``: name -> Op(handler, access, stream)."""

    def hello(ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        _only(args, "hello", "versions", "client")
        versions = args.get("versions", [PROTOCOL_VERSION])
        if not isinstance(versions, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in versions
        ):
            raise _bad("hello", "versions", "a list of integers", versions)
        if PROTOCOL_VERSION not in versions:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"no common protocol version: busd speaks {PROTOCOL_VERSION}, "
                f"the client {versions}",
            )
        return {
            "version": PROTOCOL_VERSION,
            "busd": __version__,
            "pid": os.getpid(),
            "ops": sorted(daemon.ops),
        }

    def ping(ctx: RequestContext, args: dict[str, Any]) -> str:
        _only(args, "ping")
        return "pong"

    def state(ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        _only(args, "state")
        return daemon.describe()

    def publish(ctx: RequestContext, args: dict[str, Any]) -> Any:
        _only(args, "publish", "channel", "message", "wait")
        channel = _channel(args.get("channel"), "publish")
        if "message" not in args:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'publish' needs a 'message'")
        wait = args.get("wait", False)
        if not isinstance(wait, bool):
            raise _bad("publish", "wait", "true or false", wait)
        result, acks = daemon.route(channel, args["message"], wait)
        if acks is not None:
            # A Pending, not a coroutine: answered on the last ack, with no
            # Task for each publish --wait.
            acks.finish = lambda outcomes: {**result, **outcomes}
            return acks
        elif wait:  # no broker on the channel: nothing to wait for
            result.update(acked=0, dead=0)
        return result

    def broker_target(op: str, args: dict[str, Any]) -> tuple[Any, int | None]:
        name = args.get("broker")
        if not isinstance(name, str):
            raise _bad(op, "broker", "a broker name", name)
        broker = daemon.supervisor.brokers.get(name)
        if broker is None:
            known = ", ".join(sorted(daemon.supervisor.brokers)) or "none"
            raise ProtocolError(
                ErrorCode.NOT_FOUND, f"no broker {name!r} (configured: {known})"
            )
        index = args.get("instance")
        if index is not None and (
            isinstance(index, bool) or not isinstance(index, int)
        ):
            raise _bad(op, "instance", "an instance number", index)
        if index is not None and not 0 <= index < len(broker.instances):
            raise ProtocolError(
                ErrorCode.NOT_FOUND,
                f"broker {name!r} has no instance {index} "
                f"(it has {len(broker.instances)})",
            )
        return broker, index

    def lifecycle(action: str):
        async def op(ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
            _only(args, action, "broker", "instance")
            broker, index = broker_target(action, args)
            target = broker.name if index is None else f"{broker.name}:{index}"
            log.info("%s %s requested by %s", action, target, ctx.peer)
            targets = (
                list(broker.instances) if index is None else [broker.instances[index]]
            )
            await getattr(broker, action.removeprefix("broker_"))(index)
            # Answer once the instances are RUNNING or have failed, as scale
            # does: a start that answered at STARTING would say nothing.
            await daemon.supervisor.wait_settled(targets)
            return broker.describe()

        return op

    async def scale(ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        _only(args, "scale", "broker", "instances")
        broker, _ = broker_target("scale", args)
        count = args.get("instances")
        if (
            isinstance(count, bool)
            or not isinstance(count, int)
            or not 0 <= count <= 256
        ):
            raise _bad("scale", "instances", "a whole number from 0 to 256", count)
        log.info("Scale %s to %d requested by %s", broker.name, count, ctx.peer)
        await broker.scale(count)
        await daemon.supervisor.wait_settled(broker.instances)
        return broker.describe()

    def subscribe(ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        _only(args, "subscribe", "channels")
        channels = args.get("channels")
        if not isinstance(channels, list) or not channels:
            raise _bad("subscribe", "channels", "a non-empty list of names", channels)
        names = [_channel(c, "subscribe") for c in channels]

        def deliver(channel: str, message: Any) -> None:
            ctx.emit({"channel": channel, "message": message})

        for name in names:
            daemon.hub.subscribe(name, deliver)
        ctx.open_stream(lambda: [daemon.hub.unsubscribe(n, deliver) for n in names])
        return {"channels": names}

    def events(ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        _only(args, "events")

        def forward(event: dict[str, Any]) -> None:
            ctx.emit(event)

        daemon.hub.follow_events(forward)
        ctx.open_stream(lambda: daemon.hub.unfollow_events(forward))
        return {"state": daemon.bus.state.name}

    def logs(ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        _only(args, "logs", "lines", "follow", "source")
        lines = args.get("lines", 50)
        if isinstance(lines, bool) or not isinstance(lines, int) or lines < 0:
            raise _bad("logs", "lines", "a whole number >= 0", lines)
        follow = args.get("follow", False)
        if not isinstance(follow, bool):
            raise _bad("logs", "follow", "true or false", follow)
        source = args.get("source")
        if source is not None and not isinstance(source, str):
            raise _bad("logs", "source", "a string", source)
        recent = daemon.ring.recent(min(lines, MAX_LOG_LINES), source)
        if follow:

            def forward(entry: dict[str, Any]) -> None:
                if source is None or entry["source"] == source:
                    ctx.connection.server.call_soon(ctx.emit, entry)

            daemon.ring.follow(forward)
            ctx.open_stream(lambda: daemon.ring.unfollow(forward))
        fit = newest_that_fit(recent, LOGS_ANSWER_BYTES)
        if len(fit) < len(recent):
            return {"lines": fit, "left_out": len(recent) - len(fit)}
        return {"lines": recent}

    def cancel(ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        _only(args, "cancel", "stream")
        target = args.get("stream")
        if not ctx.connection.end_stream(target):
            raise ProtocolError(
                ErrorCode.NOT_FOUND, f"no open stream with id {target!r}"
            )
        return {"cancelled": target}

    def reload(ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        _only(args, "reload")
        # A broken file is refused here, where the caller hears it; the main
        # thread reads the file again when it applies it.
        try:
            daemon.read_config()
        except (ConfigError, ValueError) as error:
            raise ProtocolError(
                ErrorCode.BAD_CONFIG,
                f"reload refused, the running configuration stays: {error}",
            ) from None
        daemon.request_main_thread("graceful", f"requested by {ctx.peer}")
        return {"reloading": True}

    def shutdown(ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        _only(args, "shutdown")
        daemon.request_main_thread("exit", f"requested by {ctx.peer}")
        return {"stopping": True, "pid": os.getpid(), "at": time.time()}

    return {
        "hello": Op(hello, READ),
        "ping": Op(ping, READ),
        "state": Op(state, READ),
        "publish": Op(publish, WRITE),
        "subscribe": Op(subscribe, READ, stream=True),
        "events": Op(events, READ, stream=True),
        "logs": Op(logs, READ, stream=True),
        "cancel": Op(cancel, READ),
        "broker_start": Op(lifecycle("broker_start"), WRITE),
        "broker_stop": Op(lifecycle("broker_stop"), WRITE),
        "broker_restart": Op(lifecycle("broker_restart"), WRITE),
        "scale": Op(scale, WRITE),
        "reload": Op(reload, WRITE),
        "shutdown": Op(shutdown, WRITE),
    }


def _only(args: dict[str, Any], op: str, *allowed: str) -> None:
    """Refuse arguments an op does not know: a typo should not pass silently."""
    for name in args:
        if name not in allowed:
            known = ", ".join(repr(a) for a in allowed) or "none"
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"{op!r} takes no argument {name!r} (it takes: {known})",
            )


def _bad(op: str, name: str, expected: str, got: Any) -> ProtocolError:
    return ProtocolError(
        ErrorCode.BAD_REQUEST,
        f"{op!r} needs {name!r} as {expected}, got {_describe(got)}",
    )


def _channel(value: Any, op: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_CHANNEL_LENGTH:
        raise _bad(
            op, "channel", f"a non-empty string of at most {MAX_CHANNEL_LENGTH}", value
        )
    return value


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def newest_that_fit(entries: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """The newest of ``entries`` (oldest first) whose encoded size fits ``budget``."""
    used = 0
    for taken, entry in enumerate(reversed(entries)):
        used += len(entry["message"].encode()) + LOG_ENTRY_OVERHEAD
        if used > budget:
            return entries[len(entries) - taken :]
    return entries
