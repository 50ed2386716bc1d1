"""``python -m busctl``: the same as the ``busctl`` command."""

import sys

from busctl.cli import main

sys.exit(main())
