"""The ops that stream what happens: ``events``, ``logs``; and ``cancel``."""

from __future__ import annotations

from typing import Any

from busd.control.requests import RequestContext
from busd.ops import args as check
from busd.ops.services import OpServices
from busd.protocol import ErrorCode, ProtocolError

MAX_LOG_LINES = 10_000
# A logs answer stays under every client's default largest frame (1 MiB):
# the newest lines that fit are sent, and the rest counted ("left_out").
LOGS_ANSWER_BYTES = 768 * 1024
# What an entry's fields besides its text take, at most, encoded.
LOG_ENTRY_OVERHEAD = 200


def events(
    services: OpServices, ctx: RequestContext, args: dict[str, Any]
) -> dict[str, Any]:
    """Stream every state change: the bus's and each instance's."""
    check.only(args, "events")
    hub = services.events

    def forward(event: dict[str, Any]) -> None:
        ctx.emit(event)

    hub.follow(forward)
    ctx.open_stream(lambda: hub.unfollow(forward))
    return {"state": services.bus_state()}


def logs(
    services: OpServices, ctx: RequestContext, args: dict[str, Any]
) -> dict[str, Any]:
    """Recent log lines (of one source), and with ``follow`` the next ones."""
    check.only(args, "logs", "lines", "follow", "source")
    lines = check.whole_number(args.get("lines", 50), "logs", "lines", 0, None)
    follow = check.boolean(args, "logs", "follow")
    source = args.get("source")
    if source is not None and not isinstance(source, str):
        raise check.bad("logs", "source", "a string", source)
    ring = services.ring
    recent = ring.recent(min(lines, MAX_LOG_LINES), source)
    if follow:
        call_soon = services.ioloop.call_soon

        def forward(entry: dict[str, Any]) -> None:
            # Log records come from any thread; the client lives on the loop.
            if source is None or entry["source"] == source:
                call_soon(ctx.emit, entry)

        ring.follow(forward)
        ctx.open_stream(lambda: ring.unfollow(forward))
    fit = newest_that_fit(recent, LOGS_ANSWER_BYTES)
    if len(fit) < len(recent):
        return {"lines": fit, "left_out": len(recent) - len(fit)}
    return {"lines": recent}


def cancel(
    services: OpServices, ctx: RequestContext, args: dict[str, Any]
) -> dict[str, Any]:
    """End one of this client's streams."""
    check.only(args, "cancel", "stream")
    target = args.get("stream")
    if not ctx.end_stream(target):
        raise ProtocolError(ErrorCode.NOT_FOUND, f"no open stream with id {target!r}")
    return {"cancelled": target}


def newest_that_fit(entries: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """The newest of ``entries`` (oldest first) whose encoded size fits ``budget``."""
    used = 0
    for taken, entry in enumerate(reversed(entries)):
        used += len(entry["message"].encode()) + LOG_ENTRY_OVERHEAD
        if used > budget:
            return entries[len(entries) - taken :]
    return entries
