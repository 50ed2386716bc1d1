"""The trivial broker of the benchmarks: every message is acknowledged at once.

busd runs it in a worker forked by its fork server (``busd.worker --handler
bench_brokers:Noop``), with ``bench/`` as the broker's ``cwd``.
"""

from __future__ import annotations

from typing import Any

from busd.plugins import SimplePlugin


class Noop(SimplePlugin):
    """Listens on ``main`` and returns: an ack, nothing else."""

    def main(self, message: Any) -> None:
        return None
