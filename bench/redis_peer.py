"""The redis-py side of scenario 3, run on bench/.venv-peers' interpreter.

A subscriber process counts the messages on channel ``bench``; this
process publishes ``--messages`` of them with pipelines of ``--window``
(no transaction) and times from the first PUBLISH to the subscriber's
last message. Then ``--calls`` single PUBLISH round trips (p50 latency).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import sys
import time

import redis
from _procs import join_or_kill
from _timing import sample_us

CHANNEL = "bench"


def subscriber(port: int, count: int, ready, out) -> None:
    """Count ``count`` messages on the channel; put the time of the last."""
    client = redis.Redis(host="127.0.0.1", port=port)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(CHANNEL)
    ready.set()
    got = 0
    while got < count:
        message = pubsub.get_message(timeout=10.0)
        if message is not None and message["type"] == "message":
            got += 1
    out.put(time.perf_counter())
    pubsub.close()
    client.close()


def main() -> int:
    """Publish, time the delivery and the single round trips; print JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--messages", type=int, default=40_000)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=0)
    parser.add_argument("--message", default="BUY ABCD 10")
    args = parser.parse_args()
    ctx = multiprocessing.get_context("fork")
    ready, out = ctx.Event(), ctx.Queue()
    sub = ctx.Process(target=subscriber, args=(args.port, args.messages, ready, out))
    sub.start()
    client = redis.Redis(host="127.0.0.1", port=args.port)
    try:
        ready.wait(30)
        while client.pubsub_numsub(CHANNEL)[0][1] < 1:
            time.sleep(0.01)
        start = time.perf_counter()
        left = args.messages
        while left:
            pipe = client.pipeline(transaction=False)
            for _ in range(min(left, args.window)):
                pipe.publish(CHANNEL, args.message)
            pipe.execute()
            left -= min(left, args.window)
        end = out.get(timeout=120)
        result = {"delivered_per_s": args.messages / (end - start)}
        result["latency"] = []
        publish = functools.partial(client.publish, "latency", args.message)
        sample_us(publish, args.calls, result["latency"])
    finally:
        client.close()
        join_or_kill(sub)
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
