"""The trivial worker supervisord and circus run: a Python process that waits.

It is the peers' counterpart of busd's ``Noop`` broker worker: an
interpreter that starts and then does nothing until SIGTERM.
"""

import signal
import sys

signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
signal.pause()
