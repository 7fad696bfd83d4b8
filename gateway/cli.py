"""`aimass serve` (the gateway) and `aimass keys` (API keys).

Both default to the embedded setup under $AIMASS_HOME (default ~/.aimass): the registry folder
`registry/`, the key database `gateway.db` and the package cache `cache/`, so `aimass keys` and
`aimass serve` on one machine share them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from aimass_common.cli import fail
from aimass_common.settings import aimass_home, default_registry
from engine.cli import add_engine_arguments, engine_config
from gateway.auth.cli import register_keys_cli


def default_keys_db() -> Path:
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
    p.add_argument(
        "--keys-db", metavar="PATH", help="API-key database (default $AIMASS_HOME/gateway.db)"
    )
    p.add_argument("--redis", metavar="URL", help="Redis for rate limits shared by replicas")
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
    register_keys_cli(subparsers, default_keys_db)


def build_config(args: argparse.Namespace):
    # deferred: the app and its services load litestar and, through the engine's loader,
    # onnxruntime (~0.5 s), which every other `aimass` command would otherwise wait for
    from gateway.app import GatewayConfig
    from gateway.models.service import ModelsConfig
    from gateway.openai.service import Limits

    if not 0 < args.port < 65536:
        raise ValueError(f"--port={args.port} must be in 1..65535")
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
        keys_db=Path(args.keys_db) if args.keys_db else default_keys_db(),
        host=args.host,
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
    # deferred: uvicorn, and the app (onnxruntime, see build_config), load only to serve
    import uvicorn

    from gateway.app import create_app

    try:
        config = build_config(args)
        app = create_app(config)
    except (ValueError, OSError) as e:
        return fail(str(e))
    configure_logging()
    open_access = app.state.open_access
    if not open_access and app.state.key_store.count() == 0:
        return fail(
            f"no API keys exist and --host {args.host} is not a loopback address: create one "
            "with `aimass keys create --project NAME --scopes inference` first"
        )
    where = f"http://{args.host}:{args.port}"
    if open_access:
        print(
            f"aimass gateway on {where} WITHOUT authentication: no API keys exist and it "
            "listens on loopback only. Create a key with `aimass keys create` to require keys.",
            file=sys.stderr,
            flush=True,
        )
    else:
        print(f"aimass gateway on {where} (API keys required)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False)
    return 0
