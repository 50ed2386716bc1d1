"""The ``busctl`` command (the client lands with issue 4)."""

from __future__ import annotations

import argparse
import sys

from busd._version import __version__


def main(argv: list[str] | None = None) -> int:
    """Parse the command line; the client itself is not implemented yet."""
    parser = argparse.ArgumentParser(
        prog="busctl", description="Talk to the busd daemon."
    )
    parser.add_argument("--version", action="version", version=f"busctl {__version__}")
    parser.parse_args(argv)
    print("busctl: the client is not implemented yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
