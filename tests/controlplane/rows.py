"""Rows for control-plane service tests, written straight to the tables (projects, people,
memberships), and the principals that act as them."""

from __future__ import annotations

from controlplane.access import Principal
from controlplane.db import Database
from controlplane.models import Member, Project, User, new_id, utcnow


def add_project(db: Database, name: str, **quotas: int | None) -> str:
    with db.session() as s:
        project = Project(id=new_id("proj"), name=name, created_at=utcnow(), **quotas)
        s.add(project)
    return project.id


def add_person(db: Database, memberships: dict[str, str] = {}) -> Principal:  # noqa: B006
    """A user who is a member of each project in `memberships` with its role."""
    user_id = new_id("user")
    with db.session() as s:
        s.add(User(id=user_id, email=f"{user_id}@example.com", display_name=user_id,
                   password_hash="-", created_at=utcnow()))  # fmt: skip
        s.flush()
        for project_id, role in memberships.items():
            s.add(Member(project_id=project_id, user_id=user_id, role=role, created_at=utcnow()))
    return Principal("user", user_id)


def key_of(project_id: str, role: str = "admin", scopes: tuple[str, ...] = ("admin",)) -> Principal:
    """A key principal of `project_id` (the services read only the principal)."""
    return Principal("key", new_id("k", "", 7), project_id=project_id, role=role, scopes=scopes)
