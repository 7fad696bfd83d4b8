"""The shapes of /v1/auth, /v1/users, /v1/projects, their members and API keys. Times are unix
seconds, as in OpenAI's API; every string and number is bounded (a value out of bounds is a 400
naming the field)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

Email = Annotated[str, Meta(min_length=3, max_length=254)]
Password = Annotated[str, Meta(min_length=1, max_length=1024)]
Name = Annotated[str, Meta(min_length=1, max_length=100)]
Role = Literal["viewer", "developer", "admin", "owner"]
Scope = Literal["inference", "models:read", "models:write", "train", "admin"]
Rate = Annotated[int, Meta(ge=1, le=10**9)]


def ts(at: datetime | None) -> int | None:
    """Unix seconds, as OpenAI's API gives times."""
    return None if at is None else int(at.timestamp())


class Login(msgspec.Struct, forbid_unknown_fields=True):
    email: Email
    password: Password


class User(msgspec.Struct, kw_only=True):
    object: Literal["user"] = "user"
    id: str
    email: str
    display_name: str
    is_admin: bool
    created_at: int
    disabled_at: int | None = None


class SignedIn(msgspec.Struct, kw_only=True):
    object: Literal["session"] = "session"
    user: User
    csrf_token: str  # send it as X-CSRF-Token with every state-changing request
    expires_at: int


class Me(msgspec.Struct, kw_only=True):
    object: Literal["principal"] = "principal"
    kind: str  # user | key | local
    id: str
    is_admin: bool
    user: User | None = None  # a person
    project_id: str | None = None  # a key's project
    role: str | None = None  # a key's role
    scopes: list[str] | None = None  # a key's scopes


class NewUser(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    email: Email
    display_name: Name
    password: Password
    is_admin: bool = False


class FirstAdmin(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    email: Email
    display_name: Name
    password: Password


class UserList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[User]


class Project(msgspec.Struct, kw_only=True):
    object: Literal["project"] = "project"
    id: str
    name: str
    created_at: int
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    role: str | None = None  # the caller's role in it


class NewProject(msgspec.Struct, forbid_unknown_fields=True):
    name: Name


class ProjectChange(msgspec.Struct, forbid_unknown_fields=True):
    """A project's new name (its quotas: PATCH /v1/projects/{project_id}/quotas)."""

    name: Name


class ProjectList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Project]


class Deleted(msgspec.Struct, kw_only=True):
    id: str
    object: str
    deleted: bool = True


class Member(msgspec.Struct, kw_only=True):
    object: Literal["project.member"] = "project.member"
    user_id: str
    email: str
    display_name: str
    role: str
    created_at: int


class NewMember(msgspec.Struct, forbid_unknown_fields=True):
    email: Email
    role: Role


class RoleChange(msgspec.Struct, forbid_unknown_fields=True):
    role: Role


class MemberList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Member]


class ApiKey(msgspec.Struct, kw_only=True):
    object: Literal["project.api_key"] = "project.api_key"
    id: str  # the public key id, `aim_<id>_…`
    project_id: str
    name: str | None
    scopes: list[str]
    role: str
    created_at: int
    created_by: str | None
    expires_at: int | None
    last_used_at: int | None
    revoked_at: int | None
    requests_per_minute: int | None
    tokens_per_minute: int | None


class NewApiKey(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    scopes: Annotated[list[Scope], Meta(min_length=1, max_length=5)]
    name: Name | None = None
    role: Role | None = None  # default: the creator's; never above it
    expires_in_days: Annotated[float, Meta(gt=0, le=3650)] | None = None
    requests_per_minute: Rate | None = None
    tokens_per_minute: Rate | None = None


class CreatedApiKey(ApiKey, kw_only=True):
    key: str  # the plaintext: shown this once, stored nowhere


class ApiKeyList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ApiKey]
