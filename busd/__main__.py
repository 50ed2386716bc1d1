"""``python -m busd``: the same as the ``busd`` command."""

import sys

from busd.cli import main

sys.exit(main())
