"""The handlers of `aimass keys|users|projects|members` (parsers: controlplane/identity_cli.py).

Each handler takes a database session and the parsed arguments, acts as `access.CLI` through
the services (so the CLI is audited and checked like the API), and prints.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from datetime import timedelta

import msgspec
from sqlalchemy import select
from sqlalchemy.orm import Session

from aimass_common.settings import aimass_home
from controlplane import identity, keys
from controlplane.access import CLI
from controlplane.db import Database
from controlplane.errors import InvalidInput, NotFound
from controlplane.identity import create_project, project_by_name, user_by_email
from controlplane.legacy_keys import import_legacy_keys
from controlplane.models import Project, utcnow


def run(args: argparse.Namespace) -> int:
    with Database.migrated(args.database) as db:
        imported = import_legacy_keys(db, aimass_home() / "gateway.db")
        if imported:
            print(f"imported {len(imported)} API keys from the former gateway.db", file=sys.stderr)
        with db.session() as s:
            return HANDLERS[args.group, args.identity_command](s, args)


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


# ── users ──


def _password(args) -> str:
    """From stdin's first line (--password-stdin), else asked twice on the terminal."""
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    if not sys.stdin.isatty():
        raise InvalidInput("no terminal to ask the password on: pass --password-stdin")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise InvalidInput("the two passwords differ")
    return first


def _print_users(args, users: list[identity.UserView]) -> None:
    if args.json:
        _print_json(users)
        return
    for u in users:
        state = f"disabled {u.disabled_at.isoformat(timespec='seconds')}" if u.disabled_at else ""
        admin = "admin" if u.is_admin else "-"
        print(f"{u.id}  {u.email}  {admin}  {u.display_name}  {state}".rstrip())


def _users_create(s: Session, args) -> int:
    identity.check_password(password := _password(args))
    user = identity.create_user(s, CLI, args.email, args.name, password, is_admin=args.admin)
    _print_users(args, [user])
    return 0


def _users_list(s: Session, args) -> int:
    _print_users(args, identity.list_users(s, CLI))
    return 0


def _users_disable(s: Session, args) -> int:
    _print_users(args, [identity.disable_user(s, CLI, _user(s, args.email).id)])
    return 0


def _user(s: Session, email: str):
    user = user_by_email(s, email)
    if user is None:
        raise NotFound(f"no user with the email {email!r}")
    return user


# ── projects ──


def _print_projects(args, projects: list[identity.ProjectView]) -> None:
    if args.json:
        _print_json(projects)
        return
    for p in projects:
        print(f"{p.id}  {p.name}  {p.created_at.isoformat(timespec='seconds')}")


def _projects_create(s: Session, args) -> int:
    project = create_project(s, CLI, args.name)
    if args.owner:
        identity.add_member(s, CLI, project.id, args.owner, "owner")
    _print_projects(args, [project])
    return 0


def _projects_list(s: Session, args) -> int:
    _print_projects(args, identity.list_projects(s, CLI))
    return 0


def _projects_delete(s: Session, args) -> int:
    project = _project(s, args.name)
    identity.delete_project(s, CLI, project.id)
    print(f"deleted project {project.name!r} ({project.id})", file=sys.stderr)
    return 0


# ── members ──


def _print_members(args, members: list[identity.MemberView]) -> None:
    if args.json:
        _print_json(members)
        return
    for m in members:
        print(f"{m.user_id}  {m.email}  {m.role}  {m.display_name}")


def _members_list(s: Session, args) -> int:
    _print_members(args, identity.list_members(s, CLI, _project(s, args.project).id))
    return 0


def _members_add(s: Session, args) -> int:
    member = identity.add_member(s, CLI, _project(s, args.project).id, args.email, args.role)
    _print_members(args, [member])
    return 0


def _members_set_role(s: Session, args) -> int:
    project, user = _project(s, args.project), _user(s, args.email)
    _print_members(args, [identity.set_role(s, CLI, project.id, user.id, args.role)])
    return 0


def _members_remove(s: Session, args) -> int:
    project, user = _project(s, args.project), _user(s, args.email)
    identity.remove_member(s, CLI, project.id, user.id)
    print(f"removed {user.email} from {project.name!r}", file=sys.stderr)
    return 0


HANDLERS = {
    ("keys", "create"): _keys_create,
    ("keys", "list"): _keys_list,
    ("keys", "revoke"): _keys_revoke,
    ("users", "create"): _users_create,
    ("users", "list"): _users_list,
    ("users", "disable"): _users_disable,
    ("projects", "create"): _projects_create,
    ("projects", "list"): _projects_list,
    ("projects", "delete"): _projects_delete,
    ("members", "list"): _members_list,
    ("members", "add"): _members_add,
    ("members", "set-role"): _members_set_role,
    ("members", "remove"): _members_remove,
}
