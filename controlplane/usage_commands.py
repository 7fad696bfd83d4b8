"""The handlers of `aimass usage|audit|config|quotas` (parsers: controlplane/usage_cli.py): each
opens the database, calls the service as `access.CLI` and returns the text to print."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from controlplane import audit, quotas, settings
from controlplane.access import CLI
from controlplane.db import Database
from controlplane.errors import InvalidInput, NotFound
from controlplane.identity import project_by_name
from controlplane.models import utcnow
from controlplane.usage import parse_time, usage_report


def _project_id(session, name: str | None) -> str | None:
    if name is None:
        return None
    project = project_by_name(session, name)
    if project is None:
        raise NotFound(f"no project named {name!r}", "project")
    return project.id


def _json(value: Any) -> str:
    return json.dumps(msgspec.to_builtins(value), indent=2)


def _utc(unix: int) -> str:
    return f"{datetime.fromtimestamp(unix, UTC):%Y-%m-%d %H:%M}"


def usage(args: argparse.Namespace) -> str:
    now = utcnow()
    until = parse_time(args.until, "--until") if args.until else now
    since = parse_time(args.since, "--since") if args.since else until - timedelta(days=1)
    with Database.migrated(args.database) as db, db.session() as s:
        buckets = usage_report(
            s,
            CLI,
            start=since,
            end=until,
            project_id=_project_id(s, args.project),
            key_id=args.key,
            model=args.model,
            group_by=args.group_by,
        )
    if args.json:
        return _json(buckets)
    lines = [f"{'start (UTC)':<17} {'project':<29} {'key':<8} {'model':<24} {'requests':>9} "
             f"{'prompt':>11} {'completion':>11} {'errors':>7}"]  # fmt: skip
    for b in buckets:
        lines.append(
            f"{_utc(b.start_time)} {b.project_id:<29} {b.key_id or '-':<8} {b.model:<24} "
            f"{b.requests:>9} {b.prompt_tokens:>11} {b.completion_tokens:>11} {b.errors:>7}"
        )
    total = sum(b.prompt_tokens + b.completion_tokens for b in buckets)
    lines.append(f"{len(buckets)} buckets, {total} tokens, {since:%Y-%m-%d %H:%M}.."
                 f"{until:%Y-%m-%d %H:%M} UTC")  # fmt: skip
    return "\n".join(lines)


def audit_log(args: argparse.Namespace) -> str:
    with Database.migrated(args.database) as db, db.session() as s:
        entries = audit.list_audit(
            s, CLI, project_id=_project_id(s, args.project), action=args.action, limit=args.limit
        )
    if args.json:
        return _json(entries)
    return (
        "\n".join(
            f"{e.id:>6} {_utc(e.at)} {e.actor:<16} {e.action:<18} {e.target} "
            f"{json.dumps(e.before)} -> {json.dumps(e.after)}"
            for e in entries
        )
        or "no entries"
    )


def config(args: argparse.Namespace) -> str:
    with Database.migrated(args.database) as db, db.session() as s:
        if args.config_command == "set":
            settings.set_value(s, CLI, args.key, _setting_value(args.key, args.value))
        values = settings.get_all(s)
    if args.key is not None:
        settings.known(args.key)
        values = {args.key: values[args.key]}
    if args.json:
        return _json(values)
    return "\n".join(f"{name} = {json.dumps(value)}" for name, value in values.items())


def _setting_value(name: str, text: str) -> Any:
    """VALUE as JSON (60, null, "tiny"); plain text for a text setting ("tiny")."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if settings.known(name).type is str:
            return text
        raise InvalidInput(f"{name} = {text!r} is not JSON (a number, or null)", name) from None


def project_quotas(args: argparse.Namespace) -> str:
    with Database.migrated(args.database) as db, db.session() as s:
        project_id = _project_id(s, args.project)
        if args.quotas_command == "set":
            changes = {q: _quota(getattr(args, q), q) for q in quotas.QUOTAS
                       if getattr(args, q) is not None}  # fmt: skip
            view = quotas.set_quotas(s, CLI, project_id, changes)
        else:
            view = quotas.get_quotas(s, CLI, project_id)
    if args.json:
        return _json(view)
    return "\n".join(f"{args.project} {q} = {getattr(view, q) or 'default'}" for q in quotas.QUOTAS)


def _quota(text: str, quota: str) -> int | None:
    if text == "none":
        return None
    try:
        return int(text)
    except ValueError:
        flag = "--" + quota.replace("_", "-")
        raise InvalidInput(
            f"{flag} {text!r} must be a whole number of tokens or 'none'", quota
        ) from None


COMMANDS: dict[str, Callable[[argparse.Namespace], str]] = {
    "usage": usage,
    "audit": audit_log,
    "config": config,
    "quotas": project_quotas,
}
