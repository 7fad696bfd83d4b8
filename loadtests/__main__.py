"""`python -m loadtests run|capacity`: the same commands as `aimass loadtest`."""

from __future__ import annotations

import argparse
import sys

from loadtests.cli import add_commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests", description="Load tests with SLO thresholds; capacity search."
    )
    add_commands(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
