"""The `aimass` command: each package registers its own subcommands.

A package adds commands through the `aimass.commands` entry-point group (see pyproject.toml):
the entry point is a function `register(subparsers)` that adds parsers whose `func` default
takes the parsed arguments and returns an exit code. Registration must stay cheap (no torch
import), so `aimass --help` is instant; the handlers import what they need and turn their
package's errors into one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aimass",
        description="From a text corpus to a fast, safe, promoted text-generation API.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for ep in sorted(entry_points(group="aimass.commands"), key=lambda e: e.name):
        ep.load()(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
