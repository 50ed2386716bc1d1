"""Broker handlers for the spool tests (run by busd's workers)."""

import json
import os

from busd.plugins.base import SimplePlugin


class Recorder(SimplePlugin):
    """Appends every message it gets on ``main`` to the file $RECORD."""

    def main(self, message):
        with open(os.environ["RECORD"], "a") as record:
            record.write(json.dumps(message) + "\n")


class Broken(SimplePlugin):
    """Fails at start, so its messages stay queued."""

    def start(self):
        raise RuntimeError("this broker never starts")
