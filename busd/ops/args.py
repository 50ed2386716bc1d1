"""Checks of an op's arguments: each wrong one is a ``bad_request`` naming it."""

from __future__ import annotations

from typing import Any

from busd.protocol import CHANNEL_NAME_RULE, ErrorCode, ProtocolError, is_channel_name
from busd.supervision.broker import Broker
from busd.supervision.supervisor import Supervisor


def only(args: dict[str, Any], op: str, *allowed: str) -> None:
    """Refuse arguments an op does not know: a typo should not pass silently."""
    for name in args:
        if name not in allowed:
            known = ", ".join(repr(a) for a in allowed) or "none"
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"{op!r} takes no argument {name!r} (it takes: {known})",
            )


def bad(op: str, name: str, expected: str, got: Any) -> ProtocolError:
    """The error for argument ``name`` of ``op``: what it needs, what came."""
    return ProtocolError(
        ErrorCode.BAD_REQUEST,
        f"{op!r} needs {name!r} as {expected}, got {describe(got)}",
    )


def channel(value: Any, op: str) -> str:
    """``value`` as a channel name (the one rule, busd.protocol)."""
    if not is_channel_name(value):
        raise bad(op, "channel", f"a channel name of {CHANNEL_NAME_RULE}", value)
    return value


def boolean(args: dict[str, Any], op: str, name: str) -> bool:
    """Argument ``name`` as true or false (false when absent)."""
    value = args.get(name, False)
    if not isinstance(value, bool):
        raise bad(op, name, "true or false", value)
    return value


def whole_number(value: Any, op: str, name: str, low: int, high: int | None) -> int:
    """``value`` as an int from ``low`` to ``high`` (None: no upper bound)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        expected = (
            f"a whole number >= {low}"
            if high is None
            else f"a whole number from {low} to {high}"
        )
        raise bad(op, name, expected, value)
    return value


def broker_target(
    supervisor: Supervisor, op: str, args: dict[str, Any]
) -> tuple[Broker, int | None]:
    """The broker (``broker``) and instance number (``instance``) an op names."""
    name = args.get("broker")
    if not isinstance(name, str):
        raise bad(op, "broker", "a broker name", name)
    broker = supervisor.brokers.get(name)
    if broker is None:
        known = ", ".join(sorted(supervisor.brokers)) or "none"
        raise ProtocolError(
            ErrorCode.NOT_FOUND, f"no broker {name!r} (configured: {known})"
        )
    index = args.get("instance")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
        raise bad(op, "instance", "an instance number", index)
    if index is not None and not 0 <= index < len(broker.instances):
        raise ProtocolError(
            ErrorCode.NOT_FOUND,
            f"broker {name!r} has no instance {index} (it has {len(broker.instances)})",
        )
    return broker, index


def describe(value: Any) -> str:
    """A short description of a wrong value: its type and the start of it."""
    if value is None:
        return "nothing"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"
