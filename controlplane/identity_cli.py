"""`aimass keys|users|projects|members …`: the control plane's people, projects and keys, for
the machine's operator (the CLI acts as `access.CLI`, a platform admin).

Every command takes `--database URL` (else $AIMASS_DATABASE, else $AIMASS_HOME/aimass.db),
upgrades its schema, imports the keys of the former key file ($AIMASS_HOME/gateway.db) once,
and prints results on stdout (`--json` for scripts), notes on stderr, and an error as one line:

    0 done   1 the database failed (unreachable, disk, locked too long)   2 bad input / not found

This module only builds the parsers; the handlers (controlplane/identity_commands.py) load
SQLAlchemy, which `aimass --help` need not wait for.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from aimass_common.cli import fail


def register(subparsers, add_database_argument: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the commands; `add_database_argument` is controlplane.cli's (which calls this)."""
    common = argparse.ArgumentParser(add_help=False)
    add_database_argument(common)
    common.add_argument("--json", action="store_true", help="print JSON, for scripts")
    for command, help, build in COMMANDS:
        p = subparsers.add_parser(command, help=help)
        sub = p.add_subparsers(dest="identity_command", metavar="COMMAND", required=True)
        build(sub, common)
        p.set_defaults(func=_run, group=command)


def _keys(sub, common) -> None:
    c = sub.add_parser("create", parents=[common], help="issue a key; prints it once")
    c.add_argument("--project", required=True, help="the project's name (created if absent)")
    c.add_argument("--scopes", required=True, metavar="SCOPE[,SCOPE...]",
                   help="comma-separated: inference, models:read, models:write, train, admin")  # fmt: skip
    c.add_argument("--role", help="viewer, developer, admin or owner (default: the least "
                   "role every scope needs)")  # fmt: skip
    c.add_argument("--name", help="a label to recognise the key by")
    c.add_argument("--expires-in", type=float, metavar="DAYS", help="expire after DAYS days")
    c.add_argument("--rpm", type=int, metavar="N", help="requests per minute (default: gateway's)")
    c.add_argument("--tpm", type=int, metavar="N", help="tokens per minute (default: gateway's)")
    c = sub.add_parser("list", parents=[common], help="keys and their state; never secrets")
    c.add_argument("--project", help="only this project's keys")
    c = sub.add_parser("revoke", parents=[common], help="revoke a key for good")
    c.add_argument("key_id", metavar="KEY_ID", help="the 8 characters after 'aim_'")


def _users(sub, common) -> None:
    c = sub.add_parser("create", parents=[common], help="add a person (password asked twice)")
    c.add_argument("--email", required=True)
    c.add_argument("--name", required=True, help="the display name")
    c.add_argument("--admin", action="store_true", help="a platform admin (may do everything)")
    c.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of stdin (scripts)")  # fmt: skip
    sub.add_parser("list", parents=[common], help="every person")
    c = sub.add_parser("disable", parents=[common], help="no more sign-in; sessions end")
    c.add_argument("email")


def _projects(sub, common) -> None:
    c = sub.add_parser("create", parents=[common], help="a new project")
    c.add_argument("name")
    c.add_argument("--owner", metavar="EMAIL", help="a person who owns it (default: none)")
    sub.add_parser("list", parents=[common], help="every project")
    c = sub.add_parser("delete", parents=[common], help="delete a project with its keys, jobs")
    c.add_argument("name")


def _members(sub, common) -> None:
    c = sub.add_parser("list", parents=[common], help="a project's members")
    c.add_argument("project")
    for name, help in (("add", "add a person by email"), ("set-role", "change a role")):
        c = sub.add_parser(name, parents=[common], help=help)
        c.add_argument("project")
        c.add_argument("email")
        c.add_argument("role", choices=("viewer", "developer", "admin", "owner"))
    c = sub.add_parser("remove", parents=[common], help="remove a member")
    c.add_argument("project")
    c.add_argument("email")


COMMANDS = [
    ("keys", "API keys: create, list, revoke", _keys),
    ("users", "people: create (the first admin), list, disable", _users),
    ("projects", "projects: create, list, delete", _projects),
    ("members", "a project's members and roles: list, add, set-role, remove", _members),
]


def _run(args: argparse.Namespace) -> int:
    # deferred: sqlalchemy, argon2 and the services, which `aimass --help` need not load
    from sqlalchemy.exc import SQLAlchemyError

    from controlplane.db import failure_line
    from controlplane.errors import ControlPlaneError
    from controlplane.identity_commands import run

    try:
        return run(args)
    except (ControlPlaneError, ValueError) as e:
        return fail(str(e))
    except BrokenPipeError:  # `... | head`: the reader left; not an error of the database
        raise
    except (SQLAlchemyError, OSError) as e:
        return fail(failure_line(e), 1)
