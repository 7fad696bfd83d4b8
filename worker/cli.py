"""`aimass worker`: run fine-tuning jobs from the control-plane database.

    aimass worker [--database URL] [--registry URI] [--concurrency 1]

Registration is cheap (argparse only); the handler imports torch and the trainer when it runs.
Exit codes: 0 stopped (SIGTERM, Ctrl-C, or --once done), 2 bad arguments, 1 the database or
registry is unreachable.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from aimass_common.cli import fail
from aimass_common.settings import aimass_home, default_registry
from controlplane.cli import add_database_argument


def register(subparsers) -> None:
    p = subparsers.add_parser("worker", help="run fine-tuning jobs from the job queue")
    add_database_argument(p)
    p.add_argument(
        "--registry",
        metavar="URI",
        help="registry the models are pushed to (default $AIMASS_REGISTRY, else "
        "$AIMASS_HOME/registry); uploaded files are read from its store when it is on S3",
    )
    p.add_argument("--concurrency", type=int, default=1, help="jobs run at once (default 1)")
    p.add_argument("--lease-s", type=float, default=30.0, metavar="S",
                   help="a job's lease: a worker silent this long is presumed dead (default 30)")  # fmt: skip
    p.add_argument("--work-dir", metavar="DIR",
                   help="run folders of the jobs (default $AIMASS_HOME/jobs)")  # fmt: skip
    p.add_argument("--once", action="store_true", help="run at most one job, then exit")
    p.set_defaults(func=_worker)


def _worker(args: argparse.Namespace) -> int:
    # deferred: torch (the trainer and exporters), which `aimass --help` must not load
    from sqlalchemy.exc import SQLAlchemyError

    from controlplane.db import Database, failure_line
    from controlplane.files import FileStore
    from registry.errors import RegistryError
    from registry.registry import Registry
    from worker.worker import Worker, WorkerConfig, stop_on_signals

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        config = WorkerConfig(lease_s=args.lease_s, concurrency=args.concurrency)
        registry_uri = args.registry or default_registry()
        db = Database.open(args.database)
        db.upgrade()
        worker = Worker(
            db,
            Registry.open(registry_uri),
            FileStore.open(registry_uri),
            Path(args.work_dir) if args.work_dir else aimass_home() / "jobs",
            config,
        )
    except (ValueError, RegistryError) as e:
        return fail(str(e))
    except SQLAlchemyError as e:
        return fail(failure_line(e), 1)
    print(f"aimass worker {worker.id} on {db.url}", file=sys.stderr, flush=True)
    try:
        with stop_on_signals(worker):
            if args.once:
                worker.run_one()
            else:
                worker.run()
    finally:
        db.close()
    return 0
