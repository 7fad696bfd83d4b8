"""The audit log: an append-only record of every change — who, what, to which thing, when, and its
state before and after. Services call `record` in the same transaction as the change itself, so a
change and its entry are committed together or not at all."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from controlplane.access import Principal
from controlplane.models import AuditEntry, utcnow


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
