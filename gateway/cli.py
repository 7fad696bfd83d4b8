"""`aimass serve`: the gateway.

It defaults to the embedded setup under $AIMASS_HOME (default ~/.aimass): the registry folder
`registry/`, the control-plane database `aimass.db` (users, projects, API keys; shared with
`aimass keys|users|projects|members`) and the package cache `cache/`. Keys of the former key
file `gateway.db` are imported into the database at start. `--workers N` (default 1) starts N
`aimass worker` child processes on the same database and registry to run fine-tuning jobs.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import threading
from pathlib import Path

from aimass_common.cli import fail
from aimass_common.settings import aimass_home, default_registry
from controlplane.cli import add_database_argument
from engine.cli import add_engine_arguments, engine_config


def default_keys_db() -> Path:
    """The former SQLite key file, whose keys are imported into the database."""
    return aimass_home() / "gateway.db"


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the gateway (OpenAI-compatible API)")
    p.add_argument(
        "--registry",
        metavar="URI",
        help="registry folder or s3://bucket/prefix (default $AIMASS_REGISTRY, else "
        "$AIMASS_HOME/registry)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    add_database_argument(p)
    p.add_argument(
        "--keys-db",
        metavar="PATH",
        help="a former SQLite key file whose keys to import (default $AIMASS_HOME/gateway.db)",
    )
    p.add_argument("--redis", metavar="URL", help="Redis for rate limits shared by replicas")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="`aimass worker` child processes that run fine-tuning jobs on the same "
                   "database and registry (default 1; 0 for an API-only replica)")  # fmt: skip
    p.add_argument("--session-hours", type=float, default=12.0, metavar="H",
                   help="how long a person's sign-in lasts")  # fmt: skip
    p.add_argument("--idle-unload", type=float, default=600.0, metavar="S",
                   help="unload a model idle this long (0 = never)")  # fmt: skip
    p.add_argument("--memory-budget-mb", type=int, default=0,
                   help="evict idle models beyond this (0 = no limit)")  # fmt: skip
    p.add_argument("--load-wait", type=float, default=60.0, metavar="S",
                   help="a request waits this long for its model to load, then 503")  # fmt: skip
    p.add_argument("--max-body-kb", type=int, default=1024)
    p.add_argument("--max-prompt-tokens", type=int, default=8192)
    p.add_argument("--max-tokens", type=int, default=4096, help="output tokens per choice, at most")
    p.add_argument("--rpm", type=int, help="default requests per minute per key")
    p.add_argument("--tpm", type=int, help="default tokens per minute per key")
    p.add_argument(
        "--remote",
        action="append",
        default=[],
        metavar="MODEL=HOST:PORT[,HOST:PORT]",
        help="serve MODEL (name or name:version) from engine servers (repeatable)",
    )
    add_engine_arguments(p)
    p.set_defaults(func=_serve)


def build_config(args: argparse.Namespace):
    # deferred: the app and its services load litestar and, through the engine's loader,
    # onnxruntime (~0.5 s), which every other `aimass` command would otherwise wait for
    from gateway.app import GatewayConfig
    from gateway.models.service import ModelsConfig
    from gateway.openai.service import Limits

    if not 0 < args.port < 65536:
        raise ValueError(f"--port={args.port} must be in 1..65535")
    if not 1 / 60 <= args.session_hours <= 720:
        raise ValueError(f"--session-hours={args.session_hours} must be in [0.017, 720]")
    for flag, value in (("--rpm", args.rpm), ("--tpm", args.tpm)):
        if value is not None and value < 1:
            raise ValueError(f"{flag}={value} must be >= 1")
    for flag, value in (("--max-prompt-tokens", args.max_prompt_tokens),
                        ("--max-tokens", args.max_tokens)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{flag}={value} must be >= 1")
    remote = {}
    for item in args.remote:
        model, _, addresses = item.partition("=")
        if not model or not addresses:
            raise ValueError(f"--remote {item!r} must be MODEL=HOST:PORT[,HOST:PORT]")
        remote[model] = addresses.split(",")
    registry = args.registry or default_registry()
    return GatewayConfig(
        registry=registry,
        database=args.database,
        legacy_keys=Path(args.keys_db) if args.keys_db else default_keys_db(),
        host=args.host,
        session_ttl_s=args.session_hours * 3600,
        redis_url=args.redis,
        max_body_bytes=args.max_body_kb * 1024,
        limits=Limits(
            max_prompt_tokens=args.max_prompt_tokens,
            max_tokens=args.max_tokens,
            requests_per_minute=args.rpm,
            tokens_per_minute=args.tpm,
        ),
        models=ModelsConfig(
            idle_unload_s=args.idle_unload,
            memory_budget_bytes=args.memory_budget_mb << 20,
            load_wait_s=args.load_wait,
            engine=engine_config(args),
            remote=remote,
            cache_dir=aimass_home() / "cache",
        ),
    )


def configure_logging() -> None:
    from gateway.app import JsonFormatter  # deferred: see build_config (onnxruntime)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def _serve(args: argparse.Namespace) -> int:
    # deferred: uvicorn, sqlalchemy, and the app (onnxruntime, see build_config), load only to serve
    import uvicorn
    from sqlalchemy.exc import SQLAlchemyError

    from controlplane.db import failure_line
    from gateway.app import create_app

    try:
        config = build_config(args)
        app = create_app(config)
    except (ValueError, OSError) as e:
        return fail(str(e))
    except SQLAlchemyError as e:
        return fail(failure_line(e), 1)
    configure_logging()
    open_access = app.state.open_access
    if not open_access and not _credentials(app.state.db):
        return fail(
            f"no users or API keys exist and --host {args.host} is not a loopback address: "
            "create an admin with `aimass users create --admin` or a key with "
            "`aimass keys create --project NAME --scopes inference` first"
        )
    where = f"http://{args.host}:{args.port}"
    if open_access:
        print(
            f"aimass gateway on {where} WITHOUT authentication: no users or API keys exist and "
            "it listens on loopback only. Create the first admin in the console "
            f"({where}/console/setup), or a person or key with `aimass users create --admin` or "
            "`aimass keys create` (seen within 5 s), to require them.",
            file=sys.stderr,
            flush=True,
        )
    else:
        print(
            f"aimass gateway on {where}, console on {where}/console (API keys or sign-in "
            f"required; database {app.state.db.url})",
            file=sys.stderr,
            flush=True,
        )
    if not 0 <= args.workers <= 64:
        return fail(f"--workers={args.workers} must be in 0..64")
    workers = [_start_worker(args, config.registry, n) for n in range(args.workers)]
    # stopped with the app: after a clean shutdown uvicorn raises the SIGTERM it caught again,
    # which ends this process before a `finally` after uvicorn.run would run
    app.on_shutdown.append(lambda: _stop_workers(workers))
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False)
    finally:
        _stop_workers(workers)  # uvicorn failed to start, or stopped without a signal
    return 0


def _start_worker(args: argparse.Namespace, registry: str, n: int) -> subprocess.Popen:
    """An `aimass worker` child on this gateway's database and registry. A worker that exits is
    reported, never restarted silently: a crash loop must be seen."""
    command = [sys.executable, "-m", "aimass_cli", "worker", "--registry", registry]
    if args.database:
        command += ["--database", args.database]
    child = subprocess.Popen(command)
    log = logging.getLogger("aimass.gateway")

    def watch() -> None:
        code = child.wait()
        if code != 0:
            log.error("worker %d (pid %d) exited with code %d; not restarted", n, child.pid, code)

    threading.Thread(target=watch, daemon=True).start()
    log.info("worker %d started (pid %d)", n, child.pid)
    return child


def _stop_workers(workers: list[subprocess.Popen], grace_s: float = 30.0) -> None:
    """SIGTERM (a running job stops at a checkpoint and goes back to the queue), then kill."""
    for child in workers:
        if child.poll() is None:
            child.terminate()
    for child in workers:
        try:
            child.wait(grace_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _credentials(db) -> bool:
    from controlplane.identity import credentials_exist  # deferred: sqlalchemy, see _serve

    with db.session() as s:
        return credentials_exist(s)
