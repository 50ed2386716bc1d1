"""Human-readable output of busctl: the state table, broker changes, log lines.

The broker part of ``busctl state`` reads like ``supervisorctl status``: a
header line per broker with its message counters, then one row per
instance, name and state in aligned columns, then ``label value`` pairs::

    orders  channels main  queued 0/10000  accepted 2  acked 1  retried 0  ...
      orders:0  RUNNING   pid 1234  up 5min 3s  restarts 0  cpu 0.3%  ...
      orders:1  BACKOFF   3 failed starts, next try in 0.4s, last exit: exit
                          status 1 before it was ready  restarts 2  ...

(one line per instance). Above the brokers, one ``Health:`` line says
whether every instance that should run is RUNNING, and if not which ones.

Every figure is read with ``.get``: an older (or newer) busd may lack one.
"""

from __future__ import annotations

import time

# typing costs busctl's start-up about 3 ms; annotations don't need it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def render_state(state: dict[str, Any], socket_path: str) -> str:
    """A ``systemctl status``-like summary of the ``state`` op's answer."""
    process = state.get("process", {})
    lines = [
        f"● busd {state.get('version', '?')} - {socket_path}",
        f"     State: {state['state']} since {_duration(state.get('uptime', 0))}",
        *_health_line(state.get("health")),
        f"  Main PID: {state['pid']} (uid {state.get('uid')}, gid {state.get('gid')})"
        + _fork_server_text(state),
        f"    Config: {state.get('config') or '(defaults)'}",
        f"    Memory: {_size(process.get('rss', 0))}   CPU: "
        f"{process.get('cpu_percent', 0):.1f}%   FDs: {process.get('fds', '?')}   "
        f"Threads: {process.get('threads', '?')}",
        f"   Clients: {state.get('clients', 0)}   Published: "
        f"{state.get('published', 0)}   Unrouted: {state.get('unrouted', 0)}",
        _dead_letters_line(state),
    ]
    brokers = state.get("brokers") or {}
    if brokers:
        lines += _brokers_lines(brokers)
    else:
        lines.append("   Brokers: none configured")
    return "\n".join(lines)


def _fork_server_text(state: dict[str, Any]) -> str:
    """``; fork server PID N``, with its restarts once it has died."""
    health = state.get("fork_server_health") or {}
    restarts = health.get("restarts", 0)
    last = f"last: {health['last_exit']}" if health.get("last_exit") else ""
    if state.get("fork_server"):
        text = f"; fork server PID {state['fork_server']}"
        if restarts:
            text += f" (restarted {restarts}x, {last})" if last else ""
        return text
    if health.get("next_start"):
        # busd's clock is this host's: busctl talks over a Unix socket.
        wait = max(0.0, health["next_start"] - time.time())
        return f"; fork server restarting in {_seconds(wait)} ({last})"
    return ""


#: The most instances the ``Health:`` line names; the rows show them all.
HEALTH_REASONS = 4


def _health_line(health: dict[str, Any] | None) -> list[str]:
    """``Health: healthy``, or ``Health: degraded - orders:0 FATAL (...)``.

    None (an older busd that judges no health): no line.
    """
    if not health:
        return []
    status = health.get("status", "?")
    reasons = list(health.get("reasons") or [])
    if not reasons:
        return [f"    Health: {status}"]
    named = ", ".join(reasons[:HEALTH_REASONS])
    more = len(reasons) - HEALTH_REASONS
    if more > 0:
        named += f" and {more} more"
    return [f"    Health: {status} - {named}"]


def _dead_letters_line(state: dict[str, Any]) -> str:
    """How many dead letters wait for an operator; how many the bound dropped."""
    count, dropped = state.get("dead_letters", 0), state.get("dead_letters_overflowed")
    line = f"      Dead: {count} letters" + (" (`busctl dead list`)" if count else "")
    if dropped:
        line += f"; {dropped} oldest dropped (store full: max_dead_letters)"
    return line


def _brokers_lines(brokers: dict[str, dict[str, Any]]) -> list[str]:
    """The ``Brokers:`` summary line, then each broker's block."""
    rows = [row for broker in brokers.values() for row in _instances(broker)]
    running = sum(row.get("state") == "RUNNING" for row in rows)
    lines = [
        f"   Brokers: {len(brokers)} configured, "
        f"{running} of {len(rows)} instances running"
    ]
    # Instance names line up across brokers: "orders:0", "audit:10".
    labels = [
        f"{n}:{r.get('index')}" for n, b in brokers.items() for r in _instances(b)
    ]
    width = max(map(len, labels), default=0)
    for name, broker in brokers.items():
        lines.append("")
        lines += _broker_lines(name, broker, width)
    return lines


def _broker_lines(name: str, broker: dict[str, Any], width: int) -> list[str]:
    """A broker's header line, then a row per instance."""
    counters = "  ".join(
        f"{key} {broker.get(key, 0)}"
        for key in ("accepted", "acked", "retried", "dead", "redelivered")
    )
    channels = ",".join(broker.get("channels", [])) or "-"
    queued = f"{broker.get('queued', 0)}/{broker.get('queue_size', '?')}"
    lines = [f"{name}  channels {channels}  queued {queued}  {counters}"]
    instances = _instances(broker)
    if not instances:
        lines.append("  (no instances: `busctl scale` starts some)")
    for row in instances:
        label = f"{name}:{row.get('index')}"
        retries = broker.get("start_retries")
        lines.append(f"  {label:<{width}}  {_instance_row(row, retries)}")
    return lines


def _instance_row(row: dict[str, Any], start_retries: int | None = None) -> str:
    """``RUNNING   pid 1234  up 5s  restarts 0  cpu 0.3%  ...  acked 120``."""
    cells = [f"{row.get('state', '?'):<8}"]
    if row.get("pid"):
        cells += [f"pid {row['pid']}", f"up {_duration(row.get('uptime', 0))}"]
    else:  # not running (STOPPED, BACKOFF, FATAL): why
        why = _why_not_running(row, start_retries)
        if why:
            cells.append(why)
    cells.append(f"restarts {row.get('restarts', 0)}")
    if "cpu_percent" in row:
        cells.append(f"cpu {row['cpu_percent']:.1f}%")
    if "rss" in row:
        cells.append(f"rss {_size(row['rss'])}")
    if "fds" in row:
        cells.append(f"fds {row['fds']}")
    cells += [f"inflight {row.get('inflight', 0)}", f"acked {row.get('acked', 0)}"]
    if row.get("nacked"):
        cells.append(f"nacked {row['nacked']}")
    return "  ".join(cells)


def _why_not_running(row: dict[str, Any], start_retries: int | None) -> str:
    """``3 failed starts, next try in 1.6s, last exit: exit status 1 before it
    was ready`` (BACKOFF); ``5 failed starts (start_retries 4), last exit:
    ...`` (FATAL); ``last exit: exit status 0`` (STOPPED)."""
    state = row.get("state")
    cause = row.get("exit_cause") or row.get("last_exit")
    parts = []
    if state in ("BACKOFF", "FATAL"):
        failures = row.get("failures") or 0
        if failures:
            plural = "" if failures == 1 else "s"
            parts.append(f"{failures} failed start{plural}")
            if state == "FATAL" and start_retries is not None:
                parts[-1] += f" (start_retries {start_retries})"
        next_try = row.get("next_try")
        if state == "BACKOFF" and next_try is not None:
            parts.append(f"next try in {_seconds(next_try)}")
    elif state == "STOPPED" and not row.get("should_run"):
        cause = row.get("last_exit")  # stopped on purpose: how it ended
    if cause:
        parts.append(f"last exit: {cause}")
    if state == "STOPPED" and row.get("should_run") and cause:
        parts.append("not restarted")
    return ", ".join(parts)


def render_pool_change(
    done: str, name: str, index: int | None, broker: dict[str, Any]
) -> str:
    """One line after start/stop/restart/scale: where the instances are now.

    ``restarted orders:1: RUNNING, PID 1234`` for one instance;
    ``started orders: 2 of 2 instances running`` for the whole broker.
    """
    instances = _instances(broker)
    if index is not None and index < len(instances):
        return f"{done} {name}:{index}: {_status(instances[index])}"
    running = sum(row.get("state") == "RUNNING" for row in instances)
    return f"{done} {name}: {running} of {len(instances)} instances running"


def not_running(name: str, index: int | None, broker: dict[str, Any]) -> str:
    """The instances (of those targeted) that are not RUNNING, or ``""``.

    ``orders:1 FATAL (exit status 3), orders:2 BACKOFF (killed by SIGKILL)``.
    """
    instances = _instances(broker)
    if index is not None:
        instances = instances[index : index + 1]
    return ", ".join(
        f"{name}:{row.get('index')} {_status(row)}"
        for row in instances
        if row.get("state") != "RUNNING"
    )


def _status(row: dict[str, Any]) -> str:
    """``RUNNING, PID 1234`` or ``FATAL (exit status 3)``."""
    state = row.get("state", "?")
    if row.get("pid"):
        return f"{state}, PID {row['pid']}"
    if row.get("last_exit"):
        return f"{state} ({row['last_exit']})"
    return str(state)


def render_log_entry(entry: dict[str, Any]) -> str:
    """One log entry as ``time level source: message``."""
    stamp = time.strftime("%H:%M:%S", time.localtime(entry.get("time", 0)))
    source = entry.get("source", "busd")
    if "instance" in entry:  # a worker's line: which instance, which process
        source = f"{source}:{entry['instance']}[{entry.get('pid', '?')}]"
    return (
        f"{stamp} {entry.get('level', 'info'):<7} {source}: {entry.get('message', '')}"
    )


def _instances(broker: dict[str, Any]) -> list[dict[str, Any]]:
    return broker.get("instances") or []


def _seconds(seconds: float) -> str:
    """``0.4s``, ``12.8s``, then as ``_duration`` from a minute on."""
    return f"{seconds:.1f}s" if seconds < 60 else _duration(seconds)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}min {seconds}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes}min"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def _size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f}{unit}" if unit != "B" else f"{int(size)}B"
        size /= 1024
    return f"{size:.1f}GiB"
