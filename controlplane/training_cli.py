"""`aimass jobs …` and `aimass files …`: fine-tuning jobs and training files, for the machine's
operator (the CLI acts as `access.CLI`; without --project it works in the project "default",
as the open-access gateway does).

    aimass files list|upload PATH|delete FILE_ID [--project NAME] [--registry URI]
    aimass jobs list [--project NAME] [--limit N]
    aimass jobs show|cancel JOB_ID
    aimass jobs events JOB_ID [--follow]      (--follow: until the job ends)

Every command takes `--database URL` and `--json`; it prints results on stdout and an error as
one line (exit 2 for bad input or something not found, 1 when the database fails).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from aimass_common.cli import fail


def register(subparsers, add_database_argument: Callable[[argparse.ArgumentParser], None]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    add_database_argument(common)
    common.add_argument("--json", action="store_true", help="print JSON, for scripts")
    scoped = argparse.ArgumentParser(add_help=False, parents=[common])
    scoped.add_argument("--project", metavar="NAME", help="project name or id (default: default)")
    stored = argparse.ArgumentParser(add_help=False, parents=[scoped])
    stored.add_argument("--registry", metavar="URI", help="the registry whose store holds "
                        "uploads when it is on S3 (default $AIMASS_REGISTRY, else "
                        "$AIMASS_HOME/registry)")  # fmt: skip

    files = _group(subparsers, "files", "training files: upload, list, delete")
    files.add_parser("list", parents=[scoped], help="the project's files, newest first")
    upload = files.add_parser("upload", parents=[stored], help="validate and store a file")
    upload.add_argument("path", metavar="PATH", help=".jsonl (text or chat), .txt or .md")
    delete = files.add_parser("delete", parents=[stored], help="delete a file and its bytes")
    delete.add_argument("file_id", metavar="FILE_ID")

    jobs = _group(subparsers, "jobs", "fine-tuning jobs: list, show, cancel, events")
    listing = jobs.add_parser("list", parents=[scoped], help="the project's jobs, newest first")
    listing.add_argument("--limit", type=int, default=20, help="jobs at most (20; 1..100)")
    for name, help in (("show", "a job's state"), ("cancel", "cancel a queued or running job")):
        jobs.add_parser(name, parents=[common], help=help).add_argument("job_id", metavar="JOB_ID")
    events = jobs.add_parser("events", parents=[common], help="a job's log and metrics")
    events.add_argument("job_id", metavar="JOB_ID")
    events.add_argument("--follow", action="store_true", help="keep printing until it ends")


def _group(subparsers, command: str, help: str):
    p = subparsers.add_parser(command, help=help)
    p.set_defaults(func=_run, command=command)
    return p.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)


def _run(args: argparse.Namespace) -> int:
    # deferred: sqlalchemy and the services, which `aimass --help` need not load
    from sqlalchemy.exc import SQLAlchemyError

    from controlplane.db import failure_line
    from controlplane.errors import ControlPlaneError
    from controlplane.training_commands import COMMANDS
    from registry.errors import RegistryError

    try:
        COMMANDS[args.command, args.subcommand](args)
    except (ControlPlaneError, RegistryError, ValueError) as e:
        return fail(str(e))
    except SQLAlchemyError as e:
        return fail(failure_line(e), 1)
    return 0
