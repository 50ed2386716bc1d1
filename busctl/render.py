"""Human-readable output of busctl: the state table and log lines."""

from __future__ import annotations

import time
from typing import Any


def render_state(state: dict[str, Any], socket_path: str) -> str:
    """A ``systemctl status``-like summary of the ``state`` op's answer."""
    process = state.get("process", {})
    lines = [
        f"● busd {state.get('version', '?')} - {socket_path}",
        f"     State: {state['state']} since {_duration(state.get('uptime', 0))}",
        f"  Main PID: {state['pid']} (uid {state.get('uid')}, gid {state.get('gid')})",
        f"    Config: {state.get('config') or '(defaults)'}",
        f"    Memory: {_size(process.get('rss', 0))}   CPU: "
        f"{process.get('cpu_percent', 0):.1f}%   FDs: {process.get('fds', '?')}   "
        f"Threads: {process.get('threads', '?')}",
        f"   Clients: {state.get('clients', 0)}   Published: "
        f"{state.get('published', 0)}   Unrouted: {state.get('unrouted', 0)}",
    ]
    brokers = state.get("brokers") or {}
    if not brokers:
        lines.append("   Brokers: none configured")
    return "\n".join(lines)


def render_log_entry(entry: dict[str, Any]) -> str:
    """One log entry as ``time level source: message``."""
    stamp = time.strftime("%H:%M:%S", time.localtime(entry.get("time", 0)))
    source = entry.get("source", "busd")
    if "instance" in entry:  # a worker's line: which instance, which process
        source = f"{source}:{entry['instance']}[{entry.get('pid', '?')}]"
    return (
        f"{stamp} {entry.get('level', 'info'):<7} {source}: {entry.get('message', '')}"
    )


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
