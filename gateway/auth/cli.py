"""`aimass keys create|list|revoke`: API keys in the gateway's SQLite file.

The file is `--db PATH`, else what the caller's `default_db()` returns ($AIMASS_HOME/gateway.db).
`create` prints the key on stdout, once, and a note on stderr; nothing else ever shows it again.
Results go to stdout, notes to stderr, and an error is one line on stderr with its exit code:

    0 done   1 the database failed (disk, permissions, locked too long)   2 bad input / no such key
"""

from __future__ import annotations

import argparse
import functools
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec

from aimass_common.cli import fail
from gateway.auth.errors import KeyInputError
from gateway.auth.service import KeyStore


def register_keys_cli(subparsers, default_db: Callable[[], Path]) -> None:
    """Add `keys` to the `aimass` sub-parsers; `default_db` is called only when a command runs."""
    p = subparsers.add_parser("keys", help="gateway API keys: create, list, revoke")
    where = "the gateway's SQLite file (default $AIMASS_HOME/gateway.db)"
    p.add_argument("--db", metavar="PATH", help=where)
    common = argparse.ArgumentParser(add_help=False)  # --db also after the subcommand
    common.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS, help=where)
    sub = p.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)

    c = sub.add_parser("create", parents=[common], help="issue a key; prints it once")
    c.add_argument("--project", required=True, help="the project the key acts for")
    c.add_argument(
        "--scopes",
        required=True,
        metavar="SCOPE[,SCOPE...]",
        help="comma-separated: inference, models:read, models:write, admin",
    )
    c.add_argument("--name", help="a label to recognise the key by")
    c.add_argument("--rpm", type=int, metavar="N", help="requests per minute (default: project's)")
    c.add_argument("--tpm", type=int, metavar="N", help="tokens per minute (default: project's)")
    c = sub.add_parser("list", parents=[common], help="keys and their state; never secrets")
    c.add_argument("--project", help="only this project's keys")
    c.add_argument("--json", action="store_true")
    c = sub.add_parser("revoke", parents=[common], help="revoke a key for good")
    c.add_argument("key_id", metavar="KEY_ID", help="the 8 characters after 'aim_'")
    p.set_defaults(func=functools.partial(_run, default_db=default_db))


def _run(args: argparse.Namespace, default_db: Callable[[], Path]) -> int:
    path = Path(args.db) if args.db else Path(default_db())
    try:
        store = KeyStore(path, cache_ttl_s=0)
        try:
            return HANDLERS[args.keys_command](store, args)
        finally:
            store.close()
    except KeyInputError as e:
        return fail(str(e))
    except BrokenPipeError:  # `... | head`: the reader left; not an error of the store
        raise
    except (sqlite3.Error, OSError) as e:
        return fail(f"{path}: {e}", 1)


def _create(store, args) -> int:
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    record, plaintext = store.create(
        args.project, scopes, name=args.name, rpm=args.rpm, tpm=args.tpm
    )
    print(plaintext)
    print(
        f"created key {record.key_id} for project {record.project!r} "
        f"({', '.join(record.scopes)}); it will not be shown again",
        file=sys.stderr,
    )
    return 0


def _list(store, args) -> int:
    records = store.list(args.project)
    if args.json:
        print(msgspec.json.encode([r.public() for r in records]).decode())
        return 0
    for r in records:
        state = f"revoked {r.revoked_at.isoformat()}" if r.revoked_at else "active"
        limits = f"rpm={r.requests_per_minute or '-'} tpm={r.tokens_per_minute or '-'}"
        print(
            f"{r.key_id}  {r.project}  {','.join(r.scopes)}  {limits}  "
            f"{r.created_at.isoformat()}  {state}  {r.name or ''}".rstrip()
        )
    if not records:
        print(
            "no keys" + (f" in project {args.project!r}" if args.project else ""), file=sys.stderr
        )
    return 0


def _revoke(store, args) -> int:
    key_id = args.key_id
    if key_id.startswith("aim_"):  # a whole key pasted: keep its id, never echo its secret
        key_id = key_id.split("_")[1]
    record = store.revoke(key_id)
    print(f"revoked {record.key_id} ({record.project})", file=sys.stderr)
    return 0


HANDLERS = {"create": _create, "list": _list, "revoke": _revoke}
