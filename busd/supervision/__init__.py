"""Supervision: pools of worker processes and the messages they carry.

``Supervisor`` (start, stop, reconfigure every broker) owns ``Broker``s
(one queue, dispatch, ack/nack/retry), which own ``Instance``s (one
worker process's life). Each is given what it needs when it is made
(``PoolServices``: how to launch a worker, where to settle a message, who
hears state changes) and reports only through that: none of them knows
its owner, so each can be built and tested alone.
"""
