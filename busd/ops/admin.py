"""The ops about busd itself: hello, ping, state, reload, shutdown."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from busd._version import __version__
from busd.config import ConfigError
from busd.control.requests import RequestContext
from busd.ops import args as check
from busd.ops.services import OpServices
from busd.protocol import PROTOCOL_VERSION, ErrorCode, ProtocolError

log = logging.getLogger("busd")


def hello(
    op_names: list[str],
    services: OpServices,
    ctx: RequestContext,
    args: dict[str, Any],
) -> dict[str, Any]:
    """Agree on a protocol version; say who busd is and which ops it has."""
    check.only(args, "hello", "versions", "client")
    versions = args.get("versions", [PROTOCOL_VERSION])
    if not isinstance(versions, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in versions
    ):
        raise check.bad("hello", "versions", "a list of integers", versions)
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
        "ops": op_names,
        # `busd start` must not take a busd on its way out for a running one.
        "state": services.bus_state(),
        "stopping": services.stopping(),
    }


def ping(services: OpServices, ctx: RequestContext, args: dict[str, Any]) -> str:
    """Answer "pong": busd is there."""
    check.only(args, "ping")
    return "pong"


def state(
    services: OpServices, ctx: RequestContext, args: dict[str, Any]
) -> dict[str, Any]:
    """The bus, this process, the brokers (busd/report.py)."""
    check.only(args, "state")
    return services.report.state()


def reload(
    services: OpServices, ctx: RequestContext, args: dict[str, Any]
) -> dict[str, Any]:
    """Reload the config file, unless it is broken (then say why)."""
    check.only(args, "reload")
    # A broken file is refused here, where the caller hears it; the main
    # thread reads the file again when it applies it.
    try:
        services.check_reload()
    except (ConfigError, ValueError) as error:
        raise ProtocolError(
            ErrorCode.BAD_CONFIG,
            f"reload refused, the running configuration stays: {error}",
        ) from None
    services.request_main_thread("graceful", f"requested by {ctx.peer}")
    return {"reloading": True}


def shutdown(
    services: OpServices, ctx: RequestContext, args: dict[str, Any]
) -> dict[str, Any]:
    """Stop busd (on the main thread, after this answer)."""
    check.only(args, "shutdown")
    services.request_main_thread("exit", f"requested by {ctx.peer}")
    return {"stopping": True, "pid": os.getpid(), "at": time.time()}
