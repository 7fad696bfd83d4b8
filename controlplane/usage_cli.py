"""`aimass usage|audit|config|quotas …`: metering, the audit log, platform settings and project
quotas, for the machine's operator (the CLI acts as `access.CLI`, a platform admin).

    aimass usage [--project NAME] [--key ID] [--model M] [--since T] [--until T] [--group-by G]
    aimass audit [--project NAME] [--action A] [--limit N]
    aimass config get [KEY]          aimass config set KEY VALUE    (VALUE as JSON: 60, null, "x")
    aimass quotas get PROJECT        aimass quotas set PROJECT [--tokens-per-day N|none] [...]

Times are unix seconds or ISO 8601 (UTC when no zone is named). Every command takes
`--database URL` and `--json`; it prints results on stdout and an error as one line (exit 2 for
bad input or something not found, 1 when the database fails).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from aimass_common.cli import fail

GROUPS = ("minute", "hour", "day")


def register(subparsers, add_database_argument: Callable[[argparse.ArgumentParser], None]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    add_database_argument(common)
    common.add_argument("--json", action="store_true", help="print JSON, for scripts")

    p = subparsers.add_parser("usage", parents=[common], help="tokens and requests used")
    p.add_argument("--project", metavar="NAME", help="one project (default: every project)")
    p.add_argument("--key", metavar="ID", help="one API key's id ('' for people's requests)")
    p.add_argument("--model", metavar="M", help="one model name")
    p.add_argument("--since", metavar="T", help="from this time (default: 24 hours ago)")
    p.add_argument("--until", metavar="T", help="up to this time (default: now)")
    p.add_argument("--group-by", choices=GROUPS, default="hour", help="bucket size (hour)")
    p.set_defaults(func=_run, command="usage")

    p = subparsers.add_parser("audit", parents=[common], help="the audit log, newest first")
    p.add_argument("--project", metavar="NAME", help="one project (default: everything)")
    p.add_argument("--action", metavar="A", help='one kind of change, e.g. "key.revoke"')
    p.add_argument("--limit", type=int, default=50, help="entries at most (50; 1..1000)")
    p.set_defaults(func=_run, command="audit")

    get, set_ = _get_set(subparsers, common, "config", "platform settings: defaults and limits",
                         "every setting, or one", "change a setting (audited)")  # fmt: skip
    get.add_argument("key", nargs="?", metavar="KEY")
    set_.add_argument("key", metavar="KEY")
    set_.add_argument("value", metavar="VALUE", help='JSON (60, null, "tiny") or plain text')

    get, set_ = _get_set(subparsers, common, "quotas", "a project's token quotas per day and "
                         "month", "a project's quotas", "change them (audited)")  # fmt: skip
    for c in (get, set_):
        c.add_argument("project", metavar="PROJECT", help="the project's name")
    for flag in ("--tokens-per-day", "--tokens-per-month"):
        set_.add_argument(flag, metavar="N|none", help="tokens; none: the platform's default")


def _get_set(subparsers, common, command: str, help: str, get_help: str, set_help: str):
    """`aimass COMMAND get|set`: the two subcommands' parsers."""
    p = subparsers.add_parser(command, help=help)
    p.set_defaults(func=_run, command=command)
    sub = p.add_subparsers(dest=f"{command}_command", metavar="COMMAND", required=True)
    return (sub.add_parser("get", parents=[common], help=get_help),
            sub.add_parser("set", parents=[common], help=set_help))  # fmt: skip


def _run(args: argparse.Namespace) -> int:
    # deferred: sqlalchemy and the services, which `aimass --help` need not load
    from sqlalchemy.exc import SQLAlchemyError

    from controlplane.db import failure_line
    from controlplane.errors import ControlPlaneError
    from controlplane.usage_commands import COMMANDS

    try:
        print(COMMANDS[args.command](args))
    except (ControlPlaneError, ValueError) as e:
        return fail(str(e))
    except SQLAlchemyError as e:
        return fail(failure_line(e), 1)
    return 0
