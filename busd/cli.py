"""The ``busd`` command (the daemon lands with issue 4)."""

from __future__ import annotations

import argparse
import sys

from busd._version import __version__


def main(argv: list[str] | None = None) -> int:
    """Parse the command line; the daemon itself is not implemented yet."""
    parser = argparse.ArgumentParser(
        prog="busd", description="The busd process bus daemon."
    )
    parser.add_argument("--version", action="version", version=f"busd {__version__}")
    parser.parse_args(argv)
    print("busd: the daemon is not implemented yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
