"""How busctl ends and prints: its exit statuses, an error line, a result.

Shared by every command module (busctl/cli.py, busctl/dead.py), which
import this one and never each other.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing costs busctl's start-up about 3 ms
if TYPE_CHECKING:
    import argparse
    from typing import Any

# sysexits.h, and 3 as ``systemctl status`` uses it.
EX_OK = 0
EX_ERROR = 1
EX_DEGRADED = 3  # busctl state: an instance that should run does not
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78


def fail(message: str, status: int) -> int:
    """Print ``busctl: message`` on stderr; return ``status`` (the exit status)."""
    print(f"busctl: {message}", file=sys.stderr)
    return status


def show(args: argparse.Namespace, value: Any, text: str) -> None:
    """Print a result: ``value`` as one JSON line with ``--json``, else ``text``."""
    if args.json:
        import json

        print(json.dumps(value, default=repr), flush=True)
    else:
        print(text, flush=True)
