"""The handlers of `aimass files|jobs` (parsers: controlplane/training_cli.py): each opens the
database, calls the service as `access.CLI` and prints a line per item, or JSON."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import msgspec

from aimass_common.settings import default_registry
from controlplane import files, jobs
from controlplane.access import CLI
from controlplane.db import Database
from controlplane.errors import NotFound

FOLLOW_POLL_S = 1.0


def _print(args: argparse.Namespace, items: list, line) -> None:
    if args.json:
        print(msgspec.json.encode(items).decode())
    else:
        for item in items:
            print(line(item))


def _file_line(f: files.FileView) -> str:
    return f"{f.id}  {f.status}  {f.bytes} bytes  {f.filename}  {f.created_at:%Y-%m-%d %H:%M:%S}"


def _job_line(j: jobs.JobView) -> str:
    error = f"  {j.error['message']}" if j.error else ""
    return (f"{j.id}  {j.status}  {j.model} -> {j.fine_tuned_model or '-'}  "
            f"{j.created_at:%Y-%m-%d %H:%M:%S}{error}")  # fmt: skip


def _event_line(e: jobs.EventView) -> str:
    return f"{e.created_at:%H:%M:%S}  {e.level:5}  {e.message}"


def files_list(args: argparse.Namespace) -> None:
    with Database.migrated(args.database) as db, db.session() as s:
        _print(args, files.list_files(s, CLI, project=args.project), _file_line)


def files_upload(args: argparse.Namespace) -> None:
    path = Path(args.path)
    if not path.is_file():
        raise NotFound(f"{path} is not a file", "path")
    store = files.FileStore.open(args.registry or default_registry())
    with Database.migrated(args.database) as db:
        with db.session() as s:
            project_id, limit = files.begin_upload(s, CLI, args.project)
        files.check_form("fine-tune", path.name)
        spool = files.Spool(store.spool_dir, limit, files.spool_suffix(path.name))
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                spool.write(chunk)
        view = files.upload(db, store, CLI, project_id=project_id, purpose="fine-tune",
                            filename=path.name, spooled=spool.close())  # fmt: skip
    _print(args, [view], _file_line)


def files_delete(args: argparse.Namespace) -> None:
    store = files.FileStore.open(args.registry or default_registry())
    with Database.migrated(args.database) as db, db.session() as s:
        _print(args, [files.delete(s, CLI, store, args.file_id)], _file_line)


def jobs_list(args: argparse.Namespace) -> None:
    with Database.migrated(args.database) as db, db.session() as s:
        _print(args, jobs.list_jobs(s, CLI, project=args.project, limit=args.limit), _job_line)


def jobs_show(args: argparse.Namespace) -> None:
    with Database.migrated(args.database) as db, db.session() as s:
        _print(args, [jobs.retrieve(s, CLI, args.job_id)], _job_line)


def jobs_cancel(args: argparse.Namespace) -> None:
    with Database.migrated(args.database) as db, db.session() as s:
        _print(args, [jobs.cancel(s, CLI, args.job_id)], _job_line)


def jobs_events(args: argparse.Namespace) -> None:
    """Oldest first; with --follow, what comes next too, until the job ends."""
    cursor = None
    with Database.migrated(args.database) as db:
        while True:
            with db.session() as s:
                finished = jobs.is_finished(s, args.job_id)
                found = jobs.list_events(s, CLI, args.job_id, after=cursor, limit=10_000,
                                         ascending=True)  # fmt: skip
            if found:
                cursor = found[-1].seq
                _print(args, found, _event_line)
                sys.stdout.flush()
            if finished or not args.follow:
                return
            time.sleep(FOLLOW_POLL_S)


COMMANDS = {
    ("files", "list"): files_list,
    ("files", "upload"): files_upload,
    ("files", "delete"): files_delete,
    ("jobs", "list"): jobs_list,
    ("jobs", "show"): jobs_show,
    ("jobs", "cancel"): jobs_cancel,
    ("jobs", "events"): jobs_events,
}
