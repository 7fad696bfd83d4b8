"""People and projects: projects, their members and roles; `role_of` for `authorize`.

Every change is audited in its own transaction (`controlplane.audit`).
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from controlplane import audit
from controlplane.access import ROLES, Principal, authorize
from controlplane.errors import Conflict, InvalidInput, NotFound
from controlplane.models import ApiKey, Member, Project, User, new_id, utcnow

MAX_NAME_LENGTH = 100  # project, key and display names


def role_of(s: Session, project_id: str, user_id: str) -> str | None:
    """The user's role in the project; None for a non-member."""
    return s.scalar(
        select(Member.role).where(Member.project_id == project_id, Member.user_id == user_id)
    )


def creator_role(s: Session, principal: Principal, project_id: str) -> str:
    """The most a thing made by `principal` in the project may do: a key's role, a member's
    role, or "owner" for platform admins and the operator."""
    if principal.is_admin:
        return ROLES[-1]
    if principal.kind == "key":
        return principal.role or ROLES[0]
    return role_of(s, project_id, principal.id) or ROLES[0]


def project_row(s: Session, project_id: str) -> Project:
    row = s.get(Project, project_id)
    if row is None:
        raise NotFound(f"no project {project_id!r}", "project_id")
    return row


def project_by_name(s: Session, name: str) -> Project | None:
    return s.scalar(select(Project).where(Project.name == name))


def check_name(field: str, value: str) -> str:
    """A name as people type it: not empty, no surrounding spaces, at most 100 characters."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{field} must be a non-empty name (got {value!r})", field)
    if value != value.strip() or len(value) > MAX_NAME_LENGTH:
        raise InvalidInput(
            f"{field} must have no surrounding spaces and at most {MAX_NAME_LENGTH} characters "
            f"(got {value!r}, {len(value)} characters)",
            field,
        )
    return value


def create_project(s: Session, principal: Principal, name: str) -> Project:
    """A new project; a person who creates one becomes its owner."""
    if principal.kind == "key":
        authorize(principal, "projects:manage", None, lambda p, u: role_of(s, p, u))
    name = check_name("name", name)
    if project_by_name(s, name) is not None:
        raise Conflict(f"a project named {name!r} exists already", "name")
    now = utcnow()
    project = Project(id=new_id("proj"), name=name, created_at=now)
    s.add(project)
    s.flush()
    if principal.kind == "user":
        s.add(Member(project_id=project.id, user_id=principal.id, role="owner", created_at=now))
    audit.record(s, principal, "project.create", project.id, project_id=project.id,
                 after={"name": name})  # fmt: skip
    return project


def credentials_exist(s: Session) -> bool:
    """Whether anyone could sign in: a user or an active API key exists. While neither does, a
    gateway on loopback serves without authentication (open access)."""
    user = s.scalar(select(User.id).limit(1))
    key = s.scalar(select(ApiKey.key_id).where(ApiKey.revoked_at.is_(None)).limit(1))
    return user is not None or key is not None
