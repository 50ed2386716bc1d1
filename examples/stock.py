"""The bank and the broker: two processes, each with its own bus.

This is the process-bus pattern in one screen. Every process owns a bus
(``busd.Bus``) and plugs its work into the bus's channels:

- ``start``/``stop``: acquire and release what the work needs;
- ``main``: a tick, published every ``--interval`` seconds by ``block()``;
- ``log``: every message, here sent on to the ``logging`` module.

The main process is the *Bank*. On every ``main`` tick it places a random
order such as ``BUY ABCD 10`` on a ``multiprocessing`` queue. The *Broker*
runs in a subprocess with a bus of its own; on each of its ``main`` ticks it
takes whatever orders are waiting and logs them. The Bank's bus also owns
the Broker's life: a plugin starts the subprocess on ``start`` and, on
``stop``, asks it to finish (a ``None`` on the queue), waits for it, and
terminates it if it does not finish in time.

Run it::

    python examples/stock.py                 # until Ctrl-C
    python examples/stock.py --orders 5      # stops by itself after 5 orders
    python examples/stock.py --interval 0.1  # faster ticks

Ctrl-C sends SIGINT to every process of the terminal's process group. The
Bank's ``block()`` turns it into ``bus.exit()``. The Broker ignores it: the
Bank started it, so the Bank stops it, once the orders already sent are
carried out. Both buses print "Bus EXITED" and the exit status is 0.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import queue
import random
import signal
import string
from multiprocessing.queues import Queue

import busd
from busd.plugins.base import SimplePlugin

#: Put on the queue by the Bank to tell the Broker that no orders will follow.
STOP = None

#: Seconds the Bank waits for the Broker to finish before terminating it.
STOP_TIMEOUT = 5.0


class LoggingBus(busd.Bus):
    """A bus whose ``log`` channel writes through the ``logging`` module."""

    def __init__(self) -> None:
        super().__init__()
        self.subscribe("log", self._write_log)

    def _write_log(self, msg: str, level: int = logging.INFO) -> None:
        logging.log(level, msg)


def setup_logging() -> None:
    """Log one line per event to stderr, naming the process and its PID."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(processName)s[%(process)d] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )


def place_order(bus: busd.Bus, order: str) -> None:
    """Carry out ``"BUY|SELL CODE N"``: log it; refuse anything else."""
    side, code, quantity = parse_order(order)
    bus.log(f"{side} order placed for {quantity} {code}")


def parse_order(order: object) -> tuple[str, str, int]:
    """Split an order; ValueError (a nack, under busd) if it is malformed."""
    parts = order.split() if isinstance(order, str) else []
    if (
        len(parts) != 3
        or parts[0] not in ("BUY", "SELL")
        or not parts[1].isalpha()
        or not parts[2].isdigit()
    ):
        raise ValueError(f"not an order of the form 'BUY|SELL CODE N': {order!r}")
    return parts[0], parts[1], int(parts[2])


def random_order() -> str:
    """An order such as ``BUY ABCD 10``."""
    side = random.choice(["BUY", "SELL"])
    code = "".join(random.choices(string.ascii_uppercase, k=4))
    return f"{side} {code} {random.randint(1, 100)}"


# -- the daemon form: the same roles as busd brokers ----------------------------


class OrderBroker(SimplePlugin):
    """The Broker as a busd broker (``handler = "examples.stock:OrderBroker"``).

    busd runs it in a worker process with that process's own bus; every
    message published on a channel the broker is configured for becomes a
    publish on this bus. Returning acknowledges the message; raising (a
    malformed order) makes busd retry it, then send it to ``dead``.
    """

    def main(self, order: object) -> None:
        place_order(self.bus, order)


class OrderBank(SimplePlugin):
    """The Bank as a busd broker: publishes a random order on busd's ``main``
    channel every ``BANK_INTERVAL`` seconds, for the OrderBrokers to carry out.
    """

    def __init__(self, bus: busd.Bus) -> None:
        super().__init__(bus)
        from busd.plugins import Monitor

        # keep_running: an order that cannot be sent (busd restarting, say)
        # is logged, and the Bank goes on; CherryPy's default would end it.
        self.monitor = Monitor(
            bus, self.place, frequency=BANK_INTERVAL, name="bank", keep_running=True
        )

    def subscribe(self) -> None:
        super().subscribe()
        self.monitor.subscribe()

    def place(self) -> None:
        order = random_order()
        self.bus.log(f"Bank sends {order}")
        self.bus.publish_upstream("main", order)


#: Seconds between two orders of the daemon-form Bank.
BANK_INTERVAL = 2.0


# -- the Broker's process ------------------------------------------------------


class Broker(SimplePlugin):
    """Carries out the orders waiting on the queue at each ``main`` tick."""

    def __init__(self, bus: busd.Bus, orders: Queue) -> None:
        super().__init__(bus)
        self.orders = orders

    def main(self) -> None:
        if not multiprocessing.parent_process().is_alive():
            self.bus.log("The Bank has gone away: exiting", logging.WARNING)
            self.bus.exit()
            return
        while True:
            try:
                order = self.orders.get_nowait()
            except queue.Empty:
                return  # nothing more for now; look again at the next tick
            if order is STOP:
                self.bus.exit()
                return
            place_order(self.bus, order)


def run_broker(orders: Queue, interval: float) -> None:
    """The Broker process: a fresh bus with the Broker plugged in."""
    setup_logging()
    bus = LoggingBus()
    Broker(bus, orders).subscribe()
    bus.start()
    bus.block(interval=interval)


# -- the Bank's process --------------------------------------------------------


class BrokerProcess(SimplePlugin):
    """Starts the Broker's process with the bus, and stops it with the bus."""

    def __init__(self, bus: busd.Bus, orders: Queue, interval: float) -> None:
        super().__init__(bus)
        self.orders = orders
        self.interval = interval
        self.process: multiprocessing.process.BaseProcess | None = None

    def start(self) -> None:
        # "spawn": the Broker starts from a clean interpreter instead of a
        # copy of this process (its threads, locks and bus included).
        context = multiprocessing.get_context("spawn")
        process = context.Process(
            target=run_broker, args=(self.orders, self.interval), name="Broker"
        )
        # A process started while SIGINT is ignored keeps ignoring it, and
        # Python then installs no KeyboardInterrupt handler: Ctrl-C can't
        # interrupt the Broker half-way through an import or an order.
        default_handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            process.start()
        finally:
            signal.signal(signal.SIGINT, default_handler)
        self.process = process
        self.bus.log(f"Broker started, PID {self.process.pid}")

    def stop(self) -> None:
        if self.process is None:
            return
        # Ask first: the Broker carries out the orders queued before STOP,
        # then exits.
        self.orders.put(STOP)
        self.process.join(STOP_TIMEOUT)
        if self.process.is_alive():
            self.bus.log("Broker did not stop in time: terminating it", logging.WARNING)
            self.process.terminate()
            self.process.join()
        self.bus.log(f"Broker stopped, exit code {self.process.exitcode}")
        self.process = None


class Bank(SimplePlugin):
    """Places one random order on the queue at each ``main`` tick."""

    def __init__(self, bus: busd.Bus, orders: Queue, limit: int | None) -> None:
        super().__init__(bus)
        self.orders = orders
        self.limit = limit
        self.placed = 0

    def main(self) -> None:
        order = random_order()
        self.orders.put(order)
        self.placed += 1
        self.bus.log(f"Bank sent order {self.placed}: {order}")
        if self.placed == self.limit:
            self.bus.exit()


def main(argv: list[str] | None = None) -> None:
    """Run the Bank, and through it the Broker, until Ctrl-C or ``--orders``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        help="seconds between main ticks, in both processes (default: 1.0)",
    )
    parser.add_argument(
        "--orders",
        type=int,
        metavar="N",
        help="exit after placing N orders (default: run until Ctrl-C)",
    )
    args = parser.parse_args(argv)
    if args.interval <= 0 or (args.orders is not None and args.orders <= 0):
        parser.error("--interval and --orders must be greater than 0")

    setup_logging()
    multiprocessing.current_process().name = "Bank"
    orders = multiprocessing.get_context("spawn").Queue()
    # Orders still unread when we exit must not keep this process waiting.
    orders.cancel_join_thread()

    bus = LoggingBus()
    BrokerProcess(bus, orders, args.interval).subscribe()
    Bank(bus, orders, args.orders).subscribe()
    bus.start()
    bus.block(interval=args.interval)  # Ctrl-C here becomes bus.exit()


if __name__ == "__main__":
    main()
