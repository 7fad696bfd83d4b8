"""The audit log: an append-only record of every change — who, what, to which thing, when, and its
state before and after. Services call `record` in the same transaction as the change itself, so a
change and its entry are committed together or not at all. `list_audit` reads it back, newest
first, for whoever may see it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from sqlalchemy import select
from sqlalchemy.orm import Session

from controlplane.access import ROLE_ACTIONS, Principal, authorize
from controlplane.errors import Forbidden, InvalidInput
from controlplane.models import AuditEntry, Member, utcnow


def record(
    session: Session,
    principal: Principal,
    action: str,
    target: str,
    *,
    project_id: str | None = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    request_id: str | None = None,
) -> None:
    """Add one entry: `action` is "<thing>.<verb>" ("member.add", "key.revoke", "job.cancel");
    `before`/`after` never hold a secret or a hash (callers pass public views)."""
    session.add(
        AuditEntry(
            at=utcnow(),
            actor=principal.actor,
            project_id=project_id,
            action=action,
            target=target,
            before=before,
            after=after,
            request_id=request_id,
        )
    )


# ── reading it ──

MAX_LIST = 1000


class AuditView(msgspec.Struct, frozen=True, kw_only=True):
    """One entry as readers see it; `at` in unix seconds (UTC), as the API shows times."""

    id: int
    at: int
    actor: str
    project_id: str | None  # None: a platform-wide change
    action: str
    target: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    request_id: str | None


def list_audit(
    session: Session,
    principal: Principal,
    *,
    project_id: str | None = None,
    actor: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
    after_id: int | None = None,
) -> list[AuditView]:
    """Entries newest first, at most `limit`; `after_id` continues a listing past that entry.
    A project's admins see its entries (`audit:read`); platform admins see every entry, the
    platform-wide ones included. Without `project_id` a person sees the projects they
    administer, a key its own project."""
    if not 1 <= limit <= MAX_LIST:
        raise InvalidInput(f"limit = {limit} is out of bounds: 1..{MAX_LIST}", "limit")
    if after_id is not None and after_id < 1:
        raise InvalidInput(f"after = {after_id} must be an entry's id (>= 1)", "after")
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    query = query.where(*_visible(session, principal, project_id))
    for column, value in ((AuditEntry.actor, actor), (AuditEntry.action, action)):
        if value is not None:
            query = query.where(column == value)
    if since is not None:
        query = query.where(AuditEntry.at >= since)
    if until is not None:
        query = query.where(AuditEntry.at < until)
    if after_id is not None:
        query = query.where(AuditEntry.id < after_id)
    return [
        AuditView(
            id=e.id,
            at=int(e.at.timestamp()),
            actor=e.actor,
            project_id=e.project_id,
            action=e.action,
            target=e.target,
            before=e.before,
            after=e.after,
            request_id=e.request_id,
        )  # fmt: skip
        for e in session.scalars(query)
    ]


def _visible(session: Session, principal: Principal, project_id: str | None) -> list:
    """The WHERE clauses limiting a listing to what `principal` may read."""

    def role_of(project: str, user: str) -> str | None:
        member = session.get(Member, (project, user))
        return member.role if member is not None else None

    if project_id is None and principal.is_admin:
        return []
    if project_id is None and principal.kind == "key":
        project_id = principal.project_id
    if project_id is not None:
        authorize(principal, "audit:read", project_id, role_of)
        return [AuditEntry.project_id == project_id]
    roles = session.execute(
        select(Member.project_id, Member.role).where(Member.user_id == principal.id)
    )
    mine = [p for p, role in roles if "audit:read" in ROLE_ACTIONS[role]]
    if not mine:
        raise Forbidden(f"{principal.actor} administers no project: audit:read needs a "
                        "project admin or owner")  # fmt: skip
    return [AuditEntry.project_id.in_(mine)]
