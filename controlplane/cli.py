"""`aimass db upgrade|current`: the control-plane database's schema.

`aimass serve` and `aimass worker` upgrade the database when they start; `aimass db upgrade`
does it alone (a deployment's migration step). `--database URL`, else $AIMASS_DATABASE, else
$AIMASS_HOME/aimass.db.
"""

from __future__ import annotations

import argparse

from aimass_common.cli import fail
from controlplane import identity_cli, training_cli, usage_cli


def add_database_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database",
        metavar="URL",
        help="control-plane database: sqlite:///PATH or postgresql://… (default "
        "$AIMASS_DATABASE, else $AIMASS_HOME/aimass.db)",
    )


def register(subparsers) -> None:
    identity_cli.register(subparsers, add_database_argument)
    usage_cli.register(subparsers, add_database_argument)
    training_cli.register(subparsers, add_database_argument)
    p = subparsers.add_parser("db", help="the control-plane database: upgrade its schema")
    sub = p.add_subparsers(dest="db_command", metavar="COMMAND", required=True)
    for name, help in (("upgrade", "run the migrations to the newest schema"),
                       ("current", "print the schema's revision")):  # fmt: skip
        c = sub.add_parser(name, help=help)
        add_database_argument(c)
        c.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # deferred: sqlalchemy and alembic, which `aimass --help` need not load
    from sqlalchemy.exc import SQLAlchemyError

    from controlplane.db import Database, failure_line

    try:
        db = Database.open(args.database)
        try:
            if args.db_command == "upgrade":
                before = db.revision()
                db.upgrade()
                print(f"{db.url}: {before or 'empty'} -> {db.revision()}")
            else:
                print(db.revision() or "empty")
        finally:
            db.close()
    except ValueError as e:
        return fail(str(e))
    except SQLAlchemyError as e:
        return fail(failure_line(e), 1)
    return 0
