"""The control plane's tables, as typed SQLAlchemy 2 ORM classes.

Every id is a string with a kind prefix (`user_…`, `proj_…`, `file-…`, `ftjob-…`), as OpenAI's
are, so an id pasted in the wrong place is recognisably wrong. Times are UTC. Usage and audit rows
are append-only; a change to anything else writes an audit row beside it (`controlplane.audit`).

The schema is created and changed only by Alembic migrations (`controlplane/migrations/`);
tests/controlplane/test_db.py checks that the migrations produce exactly these tables.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend (SQLite stores naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the control plane stores UTC times")
        return value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[str]: JSON}


# ── people, projects and their members ──


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # user_<random>
    email: Mapped[str] = mapped_column(String(254), unique=True)  # stored lower-cased
    display_name: Mapped[str] = mapped_column(String(100))
    password_hash: Mapped[str] = mapped_column(String(200))  # argon2id, with its parameters
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)  # platform admin: everything
    created_at: Mapped[datetime]
    disabled_at: Mapped[datetime | None]  # a disabled user cannot sign in; sessions end


class Session(Base):
    """A person signed in through the console: the cookie holds the token, the row its sha256."""

    __tablename__ = "sessions"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))  # echoed by forms (double submit)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]  # logout


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # proj_<random>
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime]
    # quotas: total tokens (prompt + completion) per UTC day / calendar month; None = none
    tokens_per_day: Mapped[int | None] = mapped_column(BigInteger)
    tokens_per_month: Mapped[int | None] = mapped_column(BigInteger)


class Member(Base):
    __tablename__ = "members"

    project_id: Mapped[str] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    role: Mapped[str] = mapped_column(String(16))  # controlplane.access.ROLES
    created_at: Mapped[datetime]


class ApiKey(Base):
    """A program's credential for one project: `aim_<key_id>_<secret>`; only sha256 is kept."""

    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(8), primary_key=True)
    key_sha256: Mapped[str] = mapped_column(String(64))
    project_id: Mapped[str] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str | None] = mapped_column(String(100))
    scopes: Mapped[list[str]]  # controlplane.access.SCOPES
    # the most the key may do: its creator's role when created (a viewer's key stays a viewer's)
    role: Mapped[str] = mapped_column(String(16))
    created_by: Mapped[str | None] = mapped_column(String(32))  # user id; None: the CLI
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]  # updated at most once a minute per key
    revoked_at: Mapped[datetime | None]
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    tokens_per_minute: Mapped[int | None] = mapped_column(Integer)


class ModelOwner(Base):
    """Which project a registry model name belongs to. A name with no row is shared by every
    project (the models an operator pushed with `aimass registry push`); one with a row is seen
    only by its project's members and keys: another project's request for it is a 404.

    `project_id` is deliberately not a foreign key: when a project is deleted its rows stay, so
    its models (still in the registry, which deletes nothing) stay its own — hidden from every
    project, since a deleted project has no members or keys — instead of becoming shared."""

    __tablename__ = "model_owners"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(32), index=True)
    created_at: Mapped[datetime]


# ── metering, audit and configuration ──


class Usage(Base):
    """Counts per (project, key, model, UTC minute), added to in batches (upserts)."""

    __tablename__ = "usage"

    project_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(8), primary_key=True)  # "" for a person
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    minute: Mapped[datetime] = mapped_column(primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)

    __table_args__ = (Index("usage_project_minute", "project_id", "minute"),)


class AuditEntry(Base):
    """One change: who did what to which thing, when, and its state before and after."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(64))  # "user:<id>", "key:<id>", "cli", "worker:<id>"
    project_id: Mapped[str | None] = mapped_column(String(32), index=True)  # None: platform-wide
    action: Mapped[str] = mapped_column(String(64))  # "member.add", "key.revoke", "job.cancel", …
    target: Mapped[str] = mapped_column(String(200))  # the id or name changed
    before: Mapped[dict[str, Any] | None]
    after: Mapped[dict[str, Any] | None]
    request_id: Mapped[str | None] = mapped_column(String(128))


class Setting(Base):
    """Platform configuration an admin edits at run time (rate limits, quotas, upload limits,
    default model); read by every replica, applied without a restart."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict[str, Any]]  # {"value": ...}: JSON of any type
    updated_at: Mapped[datetime]
    updated_by: Mapped[str] = mapped_column(String(64))


# ── the training platform: files and fine-tuning jobs ──


class File(Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # file-<random>
    project_id: Mapped[str] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))  # "fine-tune"
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # uploaded | processed | error
    status_details: Mapped[str | None] = mapped_column(Text)  # the validation's message
    storage_uri: Mapped[str] = mapped_column(String(500))  # where the bytes are
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # ftjob-<random>
    project_id: Mapped[str] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    model: Mapped[str] = mapped_column(String(200))  # base model NAME[:VERSION] or a preset
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40))
    suffix: Mapped[str | None] = mapped_column(String(64))
    hyperparameters: Mapped[dict[str, Any]]
    seed: Mapped[int] = mapped_column(Integer)
    # validating_files | queued | running | succeeded | failed | cancelled
    status: Mapped[str] = mapped_column(String(20), index=True)
    error: Mapped[dict[str, Any] | None]  # {"code", "message", "param"} when failed
    fine_tuned_model: Mapped[str | None] = mapped_column(String(200))  # NAME:VERSION
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    result: Mapped[dict[str, Any] | None]  # final metrics, registry version, reports
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # the queue: a worker holds a job while lease_until is in the future and renews it
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    worker_id: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (Index("jobs_queue", "status", "created_at"),)


class JobEvent(Base):
    """A job's log line or metric point, in order (`id`); what list_events and the stream read."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    at: Mapped[datetime]
    level: Mapped[str] = mapped_column(String(8))  # info | warn | error
    type: Mapped[str] = mapped_column(String(16))  # message | metrics
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None]  # metrics: step, train_loss, valid_loss, lr, tokens_per_s

    __table_args__ = (Index("job_events_job", "job_id", "id"),)


class JobCheckpoint(Base):
    __tablename__ = "job_checkpoints"

    id: Mapped[str] = mapped_column(String(48), primary_key=True)  # ftckpt-<random>
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]

    __table_args__ = (UniqueConstraint("job_id", "step"),)


def new_id(prefix: str, sep: str = "_", length: int = 24) -> str:
    """`prefix` + `sep` + `length` random characters of [a-z0-9] (124 bits at 24)."""
    return prefix + sep + "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def utcnow() -> datetime:
    return datetime.now(UTC)
