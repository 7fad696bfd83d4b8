"""People and projects: users (argon2id passwords), their sign-in sessions, projects, members
and their roles, which project a model belongs to; `role_of` for `access.authorize`.

Services take `(session, principal, ...)`, authorize first, audit every change in the same
transaction (actor, before → after), and return views that carry no hash or token.

    users      platform admins create, list and disable them; the email is stored lower-cased
    sessions   a random token in the cookie, its sha256 in `sessions`, an expiry (12 h by
               default), a CSRF token each; logout revokes; a disabled user's sessions end
    projects   anyone signed in creates one and owns it; members see theirs, admins all
    members    added by email with a role; only owners make or unmake owners; the last owner
               cannot leave or be demoted
    models     a model name with a `model_owners` row is its project's: to anyone else it is
               absent (404); a name without one is shared by all. A person's generation
               acts for the project its OpenAI-Project header names (`inference_project`)
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
from datetime import datetime, timedelta

import msgspec
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from controlplane import audit
from controlplane.access import ROLES, Principal, authorize, check_role
from controlplane.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthenticated
from controlplane.models import ApiKey, Member, ModelOwner, Project, User, new_id, utcnow
from controlplane.models import Session as SessionRow

MAX_NAME_LENGTH = 100  # project, key and display names
MAX_EMAIL_LENGTH = 254
MIN_PASSWORD_LENGTH, MAX_PASSWORD_LENGTH = 8, 1024
SESSION_TTL = timedelta(hours=12)
PROJECT_HEADER = "OpenAI-Project"  # the project a request acts for, as OpenAI's clients send it
EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_HASHER = PasswordHasher()  # argon2id, RFC 9106's second recommended parameters


def _roles(s: Session):
    return lambda project_id, user_id: role_of(s, project_id, user_id)


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


# ── users ──


class UserView(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    email: str
    display_name: str
    is_admin: bool
    created_at: datetime
    disabled_at: datetime | None = None


def _user_view(u: User) -> UserView:
    return UserView(id=u.id, email=u.email, display_name=u.display_name, is_admin=u.is_admin,
                    created_at=u.created_at, disabled_at=u.disabled_at)  # fmt: skip


def normalize_email(email: str) -> str:
    value = email.strip().lower() if isinstance(email, str) else ""
    if len(value) > MAX_EMAIL_LENGTH or not EMAIL_RE.fullmatch(value):
        raise InvalidInput(
            f"email {email!r} must be an address like name@example.org of at most "
            f"{MAX_EMAIL_LENGTH} characters",
            "email",
        )
    return value


def check_password(password: str) -> str:
    if (
        not isinstance(password, str)
        or not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH
    ):
        size = len(password) if isinstance(password, str) else type(password).__name__
        raise InvalidInput(
            f"password must have {MIN_PASSWORD_LENGTH}..{MAX_PASSWORD_LENGTH} characters "
            f"(got {size})",
            "password",
        )
    return password


def create_user(
    s: Session,
    principal: Principal,
    email: str,
    display_name: str,
    password: str,
    *,
    is_admin: bool = False,
) -> UserView:
    """A new person (a platform admin's action; the CLI bootstraps the first admin)."""
    authorize(principal, "users:manage", None, _roles(s))
    email = normalize_email(email)
    if s.scalar(select(User.id).where(User.email == email)) is not None:
        raise Conflict(f"a user with the email {email!r} exists already", "email")
    user = User(
        id=new_id("user"),
        email=email,
        display_name=check_name("display_name", display_name),
        password_hash=_HASHER.hash(check_password(password)),
        is_admin=bool(is_admin),
        created_at=utcnow(),
    )
    s.add(user)
    view = _user_view(user)
    audit.record(s, principal, "user.create", user.id, after=msgspec.to_builtins(view))
    return view


def users_exist(s: Session) -> bool:
    return s.scalar(select(User.id).limit(1)) is not None


def create_first_admin(s: Session, email: str, display_name: str, password: str) -> UserView:
    """The first platform admin of a platform with no users (the console's first-run page);
    Conflict once anyone exists, so it can never make a second one."""
    # Two first-run requests at once would each read "no user" and each insert an admin: the
    # second must wait for the first's transaction, then see its admin. PostgreSQL: an
    # advisory lock for the transaction. SQLite: a write first (of no row), which takes the
    # database's one write lock before the read.
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(7106)"))
    elif dialect == "sqlite":
        s.execute(text("UPDATE users SET id = id WHERE 0"))
    if users_exist(s):
        raise Conflict("the platform has users already: an admin signs in and adds people")
    return create_user(s, Principal("local", is_admin=True), email, display_name, password,
                       is_admin=True)  # fmt: skip


def list_users(s: Session, principal: Principal) -> list[UserView]:
    authorize(principal, "users:manage", None, _roles(s))
    return [_user_view(u) for u in s.scalars(select(User).order_by(User.created_at, User.email))]


def disable_user(s: Session, principal: Principal, user_id: str) -> UserView:
    """The user can no longer sign in; their sessions end now, and the keys they made are
    revoked."""
    authorize(principal, "users:manage", None, _roles(s))
    user = s.get(User, user_id)
    if user is None:
        raise NotFound(f"no user {user_id!r}", "user_id")
    if user.disabled_at is None:
        before = msgspec.to_builtins(_user_view(user))
        now = utcnow()
        user.disabled_at = now
        s.execute(update(SessionRow).where(SessionRow.user_id == user_id,
                                           SessionRow.revoked_at.is_(None))
                  .values(revoked_at=now))  # fmt: skip
        audit.record(s, principal, "user.disable", user_id, before=before,
                     after=msgspec.to_builtins(_user_view(user)))  # fmt: skip
        _limit_keys(s, principal, user_id, None, None)
    return _user_view(user)


def user_by_email(s: Session, email: str) -> User | None:
    return s.scalar(select(User).where(User.email == normalize_email(email)))


# ── sessions ──


class SignedIn(msgspec.Struct, frozen=True, kw_only=True):
    """A session as its owner may see it: never the token (only the cookie holds it)."""

    user: UserView
    csrf_token: str
    expires_at: datetime


def login(
    s: Session,
    email: str,
    password: str,
    *,
    now: datetime | None = None,
    ttl: timedelta = SESSION_TTL,
) -> tuple[SignedIn, str]:
    """(the session, its token for the cookie). A wrong email or password, or a disabled
    user, is one `Unauthenticated` that does not say which; an unknown email costs the same
    argon2 verification as a known one."""
    now = now or utcnow()
    user = s.scalar(select(User).where(User.email == email.strip().lower()))
    stored = user.password_hash if user is not None else _dummy_hash(_HASHER)
    try:
        _HASHER.verify(stored, password)
        ok = user is not None and user.disabled_at is None
    except (VerificationError, InvalidHashError):
        ok = False
    if not ok:
        raise Unauthenticated("wrong email or password")
    token = secrets.token_urlsafe(32)
    row = SessionRow(token_sha256=_sha256(token), user_id=user.id,
                     csrf_token=secrets.token_urlsafe(32), created_at=now,
                     expires_at=now + ttl)  # fmt: skip
    s.add(row)
    if _HASHER.check_needs_rehash(user.password_hash):
        user.password_hash = _HASHER.hash(password)
    principal = Principal("user", user.id, is_admin=user.is_admin)
    audit.record(s, principal, "session.create", user.id,
                 after={"expires_at": row.expires_at.isoformat()})  # fmt: skip
    return SignedIn(
        user=_user_view(user), csrf_token=row.csrf_token, expires_at=row.expires_at
    ), token


def session_of(
    s: Session, token: str, *, now: datetime | None = None
) -> tuple[Principal, SignedIn]:
    """The person a session cookie's token signs in, and the session (its CSRF token);
    `Unauthenticated` if it is unknown, revoked, expired or its user disabled."""
    now = now or utcnow()
    row = s.get(SessionRow, _sha256(token)) if token else None
    if row is None or row.revoked_at is not None:
        raise Unauthenticated("not signed in: the session is unknown or ended; sign in again")
    if row.expires_at <= now:
        raise Unauthenticated(f"the session expired at {row.expires_at.isoformat()}; sign in again")
    user = s.get(User, row.user_id)
    if user is None or user.disabled_at is not None:
        raise Unauthenticated("not signed in: the user is disabled")
    principal = Principal("user", user.id, is_admin=user.is_admin)
    return principal, SignedIn(user=_user_view(user), csrf_token=row.csrf_token,
                               expires_at=row.expires_at)  # fmt: skip


def csrf_matches(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def logout(s: Session, token: str, *, now: datetime | None = None) -> None:
    """End the session (revoked: its cookie never signs in again); unknown tokens are a no-op."""
    row = s.get(SessionRow, _sha256(token)) if token else None
    if row is not None and row.revoked_at is None:
        row.revoked_at = now or utcnow()
        audit.record(s, Principal("user", row.user_id), "session.revoke", row.user_id)


@functools.cache
def _dummy_hash(hasher: PasswordHasher) -> str:
    """A hash to verify an unknown email's password against, made with the same parameters
    (made once, at the first such sign-in: ~0.5 s that every import would otherwise pay)."""
    return hasher.hash(secrets.token_urlsafe(16))


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# ── projects ──


class ProjectView(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    created_at: datetime
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    role: str | None = None  # the caller's role in it (None: a platform admin who is not in it)


def _project_view(p: Project, role: str | None) -> ProjectView:
    return ProjectView(id=p.id, name=p.name, created_at=p.created_at, role=role,
                       tokens_per_day=p.tokens_per_day, tokens_per_month=p.tokens_per_month)  # fmt: skip


def create_project(s: Session, principal: Principal, name: str) -> ProjectView:
    """A new project; a person who creates one becomes its owner. A key cannot."""
    if principal.kind == "key":
        raise Forbidden(f"API key {principal.id} may not create projects; a person may")
    name = check_name("name", name)
    if project_by_name(s, name) is not None:
        raise Conflict(f"a project named {name!r} exists already", "name")
    now = utcnow()
    project = Project(id=new_id("proj"), name=name, created_at=now)
    s.add(project)
    s.flush()
    role = None
    if principal.kind == "user":
        role = "owner"
        s.add(Member(project_id=project.id, user_id=principal.id, role=role, created_at=now))
    audit.record(s, principal, "project.create", project.id, project_id=project.id,
                 after={"name": name})  # fmt: skip
    return _project_view(project, role)


def list_projects(s: Session, principal: Principal) -> list[ProjectView]:
    """The projects `principal` may see: a key its own, a person theirs, an admin all."""
    query = select(Project, Member.role).outerjoin(
        Member, (Member.project_id == Project.id) & (Member.user_id == principal.id)
    )
    if principal.kind == "key":
        query = query.where(Project.id == principal.project_id)
    elif not principal.is_admin:
        query = query.where(Member.role.is_not(None))
    rows = s.execute(query.order_by(Project.name))
    return [
        _project_view(p, principal.role if principal.kind == "key" else role) for p, role in rows
    ]


def get_project(s: Session, principal: Principal, project_id: str) -> ProjectView:
    authorize(principal, "project:read", project_id, _roles(s))
    role = principal.role if principal.kind == "key" else role_of(s, project_id, principal.id)
    return _project_view(project_row(s, project_id), role)


def rename_project(s: Session, principal: Principal, project_id: str, name: str) -> ProjectView:
    authorize(principal, "project:write", project_id, _roles(s))
    project = project_row(s, project_id)
    name = check_name("name", name)
    if name != project.name:
        if project_by_name(s, name) is not None:
            raise Conflict(f"a project named {name!r} exists already", "name")
        audit.record(s, principal, "project.rename", project_id, project_id=project_id,
                     before={"name": project.name}, after={"name": name})  # fmt: skip
        project.name = name
    return get_project(s, principal, project_id)


def delete_project(s: Session, principal: Principal, project_id: str) -> None:
    """Delete a project with its members, keys, files and jobs (the database cascades). Its
    model names stay its own (`ModelOwner`): hidden from every project, never shared."""
    authorize(principal, "project:delete", project_id, _roles(s))
    project = project_row(s, project_id)
    audit.record(s, principal, "project.delete", project_id, project_id=project_id,
                 before={"name": project.name})  # fmt: skip
    s.delete(project)


# ── members ──


class MemberView(msgspec.Struct, frozen=True, kw_only=True):
    user_id: str
    email: str
    display_name: str
    role: str
    created_at: datetime


def list_members(s: Session, principal: Principal, project_id: str) -> list[MemberView]:
    authorize(principal, "members:read", project_id, _roles(s))
    rows = s.execute(select(Member, User).join(User, User.id == Member.user_id)
                     .where(Member.project_id == project_id).order_by(User.email))  # fmt: skip
    return [_member_view(m, u) for m, u in rows]


def add_member(
    s: Session, principal: Principal, project_id: str, email: str, role: str
) -> MemberView:
    """Add the user with this email; only an owner adds an owner."""
    authorize(principal, "members:manage", project_id, _roles(s))
    _check_owner_change(s, principal, project_id, check_role(role))
    user = user_by_email(s, email)
    if user is None:
        raise NotFound(f"no user with the email {email!r}; a platform admin creates users", "email")
    if role_of(s, project_id, user.id) is not None:
        raise Conflict(f"{user.email} is a member already; change their role instead", "email")
    member = Member(project_id=project_id, user_id=user.id, role=role, created_at=utcnow())
    s.add(member)
    view = _member_view(member, user)
    audit.record(s, principal, "member.add", user.id, project_id=project_id,
                 after=msgspec.to_builtins(view))  # fmt: skip
    return view


def set_role(
    s: Session, principal: Principal, project_id: str, user_id: str, role: str
) -> MemberView:
    """Change a member's role; to or from owner only by an owner; never the last owner's."""
    authorize(principal, "members:manage", project_id, _roles(s))
    member, user = _member(s, project_id, user_id)
    check_role(role)
    if role != member.role:
        for changed in {role, member.role} & {"owner"}:
            _check_owner_change(s, principal, project_id, changed)
        if member.role == "owner":
            _keep_an_owner(s, project_id, "demote")
        before = msgspec.to_builtins(_member_view(member, user))
        member.role = role
        audit.record(s, principal, "member.role", user_id, project_id=project_id, before=before,
                     after=msgspec.to_builtins(_member_view(member, user)))  # fmt: skip
        _limit_keys(s, principal, user_id, project_id, role)
    return _member_view(member, user)


def remove_member(s: Session, principal: Principal, project_id: str, user_id: str) -> None:
    """Remove a member (or leave: anyone may remove themselves); never the last owner."""
    leaving = principal.kind == "user" and principal.id == user_id
    if not leaving:
        authorize(principal, "members:manage", project_id, _roles(s))
    member, user = _member(s, project_id, user_id)
    if member.role == "owner":
        if not leaving:
            _check_owner_change(s, principal, project_id, "owner")
        _keep_an_owner(s, project_id, "remove")
    audit.record(s, principal, "member.remove", user_id, project_id=project_id,
                 before=msgspec.to_builtins(_member_view(member, user)))  # fmt: skip
    s.delete(member)
    _limit_keys(s, principal, user_id, project_id, None)


def _limit_keys(
    s: Session, principal: Principal, user_id: str, project_id: str | None, role: str | None
) -> None:
    """A person's keys never outlive or outrank them: when they leave a project (`role` None),
    or are disabled (`project_id` None: every project), their keys there are revoked; when their
    role is lowered, so is that of their keys above it. Each change audited. Another gateway
    replica's key cache sees it within its bound (5 s), as for any revocation."""
    query = select(ApiKey).where(ApiKey.created_by == user_id, ApiKey.revoked_at.is_(None))
    if project_id is not None:
        query = query.where(ApiKey.project_id == project_id)
    for key in s.scalars(query):
        if role is None:
            key.revoked_at = utcnow()
            audit.record(s, principal, "key.revoke", key.key_id, project_id=key.project_id,
                         after={"revoked_at": key.revoked_at.isoformat(),
                                "reason": "its creator left or was disabled"})  # fmt: skip
        elif ROLES.index(key.role) > ROLES.index(role):
            audit.record(s, principal, "key.role", key.key_id, project_id=key.project_id,
                         before={"role": key.role}, after={"role": role})  # fmt: skip
            key.role = role


def _member(s: Session, project_id: str, user_id: str) -> tuple[Member, User]:
    row = s.execute(select(Member, User).join(User, User.id == Member.user_id)
                    .where(Member.project_id == project_id, Member.user_id == user_id)).first()  # fmt: skip
    if row is None:
        raise NotFound(f"no member {user_id!r} in project {project_id!r}", "user_id")
    return row[0], row[1]


def _check_owner_change(s: Session, principal: Principal, project_id: str, role: str) -> None:
    if role == "owner":
        authorize(principal, "members:owner", project_id, _roles(s))


def _keep_an_owner(s: Session, project_id: str, verb: str) -> None:
    owners = s.scalar(select(func.count()).select_from(Member)
                      .where(Member.project_id == project_id, Member.role == "owner"))  # fmt: skip
    if owners <= 1:
        raise Conflict(f"cannot {verb} the last owner of project {project_id!r}; make another "
                       "member owner first", "role")  # fmt: skip


def _member_view(m: Member, u: User) -> MemberView:
    return MemberView(user_id=u.id, email=u.email, display_name=u.display_name, role=m.role,
                      created_at=m.created_at)  # fmt: skip


# ── models of a project ──


def model_owners(s: Session) -> dict[str, str]:
    """Every owned model name and its project; a name absent here is shared by all."""
    return {
        name: project for name, project in s.execute(select(ModelOwner.name, ModelOwner.project_id))
    }


def may_see_model(s: Session | None, principal: Principal, owner: str | None) -> bool:
    """Whether a model of project `owner` (None: shared) exists for `principal`; only a
    person's membership reads the database (`s` may be None for the others)."""
    if owner is None or principal.is_admin:
        return True
    if principal.kind == "key":
        return principal.project_id == owner
    return role_of(s, owner, principal.id) is not None


def own_model(s: Session, principal: Principal, project_id: str, name: str) -> None:
    """Make the registry model `name` the project's (models:write); audited."""
    authorize(principal, "models:write", project_id, _roles(s))
    row = s.get(ModelOwner, name)
    if row is not None and row.project_id != project_id:
        raise Conflict(f"the model name {name!r} is taken", "name")
    if row is None:
        s.add(ModelOwner(name=name, project_id=project_id, created_at=utcnow()))
        audit.record(s, principal, "model.own", name, project_id=project_id,
                     after={"project_id": project_id})  # fmt: skip


def inference_project(s: Session, principal: Principal, project: str | None) -> str:
    """The id of the project a generation request acts for, named (id or name) by its
    `OpenAI-Project` header: the project its tokens are metered and quota-checked under. A
    person must name one in which they may `inference`; a key may name only its own. A project
    that does not exist or that the caller is outside of is absent to them (NotFound)."""
    if not project:
        raise InvalidInput(
            "a signed-in person's generation request must name the project it acts for in the "
            "OpenAI-Project header (the project's id or name)",
            PROJECT_HEADER,
        )
    row = s.get(Project, project) or project_by_name(s, project)
    if row is not None:
        try:
            authorize(principal, "inference", row.id, _roles(s))
        except NotFound:
            row = None
    if row is None:  # named as given: the id of a project one is outside of is no answer
        raise NotFound(f"no project {project!r}", PROJECT_HEADER)
    return row.id


def credentials_exist(s: Session) -> bool:
    """Whether anyone could sign in: a user or an active API key exists. While neither does, a
    gateway on loopback serves without authentication (open access)."""
    user = s.scalar(select(User.id).limit(1))
    key = s.scalar(select(ApiKey.key_id).where(ApiKey.revoked_at.is_(None)).limit(1))
    return user is not None or key is not None
