"""The handlers of `aimass keys|users|projects|members` (parsers: controlplane/identity_cli.py).

Each handler takes a database session and the parsed arguments, acts as `access.CLI` through
the services (so the CLI is audited and checked like the API), and prints.
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta

import msgspec
from sqlalchemy import select
from sqlalchemy.orm import Session

from aimass_common.settings import aimass_home
from controlplane import keys
from controlplane.access import CLI
from controlplane.db import Database
from controlplane.errors import InvalidInput, NotFound
from controlplane.identity import create_project, project_by_name
from controlplane.legacy_keys import import_legacy_keys
from controlplane.models import Project, utcnow


def run(args: argparse.Namespace) -> int:
    db = Database.open(args.database)
    try:
        db.upgrade()
        imported = import_legacy_keys(db, aimass_home() / "gateway.db")
        if imported:
            print(f"imported {len(imported)} API keys from the former gateway.db", file=sys.stderr)
        with db.session() as s:
            return HANDLERS[args.group, args.identity_command](s, args)
    finally:
        db.close()


def _print_json(value) -> None:
    print(msgspec.json.encode(value).decode())


def _project(s: Session, name: str) -> Project:
    row = project_by_name(s, name)
    if row is None:
        raise NotFound(f"no project named {name!r}; create it with `aimass projects create`")
    return row


# ── keys ──


def _keys_create(s: Session, args) -> int:
    scopes = keys.check_scopes([x.strip() for x in args.scopes.split(",") if x.strip()])
    project = project_by_name(s, args.project)
    created = project is None
    if created:
        project = create_project(s, CLI, args.project)
    expires_at = None
    if args.expires_in is not None:
        if not 0 < args.expires_in <= 3650:
            raise InvalidInput(f"--expires-in={args.expires_in} must be in (0, 3650] days")
        expires_at = utcnow() + timedelta(days=args.expires_in)
    record, plaintext = keys.create_key(
        s, CLI, project.id, scopes, role=args.role or keys.least_role_for(scopes),
        name=args.name, expires_at=expires_at, rpm=args.rpm, tpm=args.tpm,
    )  # fmt: skip
    if created:
        print(f"created project {project.name!r} ({project.id})", file=sys.stderr)
    if args.json:
        _print_json(record.public() | {"key": plaintext, "project": project.name})
    else:
        print(plaintext)
    print(
        f"created key {record.key_id} for project {project.name!r} "
        f"({', '.join(record.scopes)}; role {record.role}); it will not be shown again",
        file=sys.stderr,
    )
    return 0


def _keys_list(s: Session, args) -> int:
    projects = [_project(s, args.project)] if args.project else list(
        s.scalars(select(Project).order_by(Project.name))
    )  # fmt: skip
    found = [(p, k) for p in projects for k in keys.list_keys(s, CLI, p.id)]
    if args.json:
        _print_json([k.public() | {"project": p.name} for p, k in found])
        return 0
    for p, k in found:
        state = "active"
        if k.revoked_at:
            state = f"revoked {k.revoked_at.isoformat(timespec='seconds')}"
        elif k.expires_at:
            state = f"expires {k.expires_at.isoformat(timespec='seconds')}"
        limits = f"rpm={k.requests_per_minute or '-'} tpm={k.tokens_per_minute or '-'}"
        print(
            f"{k.key_id}  {p.name}  {','.join(k.scopes)}  {k.role}  {limits}  "
            f"{k.created_at.isoformat(timespec='seconds')}  {state}  {k.name or ''}".rstrip()
        )
    if not found:
        where = f" in project {args.project!r}" if args.project else ""
        print(f"no keys{where}", file=sys.stderr)
    return 0


def _keys_revoke(s: Session, args) -> int:
    key_id = args.key_id
    if key_id.startswith("aim_"):  # a whole key pasted: keep its id, never echo its secret
        key_id = key_id.split("_")[1]
    record = keys.revoke_key(s, CLI, keys.project_of_key(s, key_id), key_id)
    if args.json:
        _print_json(record.public())
    print(f"revoked {record.key_id}", file=sys.stderr)
    return 0


HANDLERS = {
    ("keys", "create"): _keys_create,
    ("keys", "list"): _keys_list,
    ("keys", "revoke"): _keys_revoke,
}
