"""Project token quotas: total tokens (prompt + completion) per UTC day and per calendar month.

A project's own quota (`projects.tokens_per_day` / `tokens_per_month`) wins; a project that
sets none has the platform's default (`controlplane.settings`); none there either means no
limit. The gateway calls `Quotas.check(project_id)` before it admits a request: a project that
has used its quota gets `QuotaExceeded` naming the quota, the tokens used, the limit and when it
resets (the next UTC midnight, or the first of next month).

Used = the usage table's sums (every replica's flushed counts) + this process's counts not yet
flushed. The sums are cached for `ttl_s` (2 s) and re-read sooner when this process flushes, so
the check stays off the database on the hot path; another replica's tokens count here within
`ttl_s` plus its flush interval. A request is admitted while the quota is not used up, so the
last one admitted may run past it by its own length.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import msgspec
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from controlplane import audit
from controlplane.access import Principal, authorize
from controlplane.db import Database
from controlplane.errors import InvalidInput, QuotaExceeded
from controlplane.identity import project_row, role_of
from controlplane.models import Project, Usage, utcnow
from controlplane.settings import KNOWN, SettingsCache
from controlplane.usage import UsageRecorder

QUOTAS = ("tokens_per_day", "tokens_per_month")


@dataclass(frozen=True)
class _Read:
    """One project's limits and flushed sums, as read at `read_at` (monotonic)."""

    read_at: float
    flushes: int  # the recorder's flush count then: a flush since makes this stale
    day: datetime  # the UTC day and month these sums are for
    month: datetime
    limits: tuple[int | None, int | None]  # per day, per month
    used: tuple[int, int]


class Quotas:
    def __init__(
        self,
        db: Database,
        settings: SettingsCache,
        recorder: UsageRecorder | None = None,
        *,
        ttl_s: float = 2.0,  # the most a read of the sums is trusted
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = utcnow,  # which day and month it is
    ):
        self.db, self.settings, self.recorder = db, settings, recorder
        self.ttl_s, self.clock, self.now = ttl_s, clock, now
        self._reads: dict[str, _Read] = {}
        self._lock = threading.Lock()

    def stale(self, project_id: str) -> bool:
        """True when `check` would read the database first (call `refresh` off the loop)."""
        read = self._reads.get(project_id)
        return (
            read is None
            or self.clock() - read.read_at >= self.ttl_s
            or read.flushes != self._flushes()
            or read.day != _day(self.now())
        )

    def refresh(self, project_id: str) -> None:
        """Read the project's limits and its sums for this day and month (blocking)."""
        flushes, today = self._flushes(), _day(self.now())
        month = today.replace(day=1)
        defaults = self.settings.values()
        with self.db.session() as session:
            project = session.get(Project, project_id)
            own = (project.tokens_per_day, project.tokens_per_month) if project else (None, None)
            limits = tuple(
                o if o is not None else defaults[q] for o, q in zip(own, QUOTAS, strict=True)
            )
            used = (0, 0)
            if project is not None and limits != (None, None):
                used = _sums(session, project_id, today, month)
        with self._lock:
            self._reads[project_id] = _Read(self.clock(), flushes, today, month, limits, used)

    def check(self, project_id: str) -> None:
        """Raise `QuotaExceeded` if the project has used a quota up."""
        if self.stale(project_id):
            self.refresh(project_id)
        read = self._reads[project_id]
        periods = (
            (read.day, read.day + timedelta(days=1)),
            (read.month, _next_month(read.month)),
        )
        for quota, limit, used, (since, resets_at) in zip(
            QUOTAS, read.limits, read.used, periods, strict=True
        ):
            if limit is None:
                continue
            used += self.recorder.pending_tokens(project_id, since) if self.recorder else 0
            if used >= limit:
                raise QuotaExceeded(
                    f"project {project_id} has used {used:,} tokens of its {quota} quota of "
                    f"{limit:,}; it resets at {resets_at.isoformat().replace('+00:00', 'Z')}",
                    quota,
                    resets_at,
                )

    def _flushes(self) -> int:
        return self.recorder.flushes if self.recorder else 0


def _sums(session: Session, project_id: str, day: datetime, month: datetime) -> tuple[int, int]:
    tokens = Usage.prompt_tokens + Usage.completion_tokens
    row = session.execute(
        select(
            func.coalesce(func.sum(case((Usage.minute >= day, tokens), else_=0)), 0),
            func.coalesce(func.sum(tokens), 0),
        ).where(Usage.project_id == project_id, Usage.minute >= month)
    ).one()
    return int(row[0]), int(row[1])


def _day(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def _next_month(month: datetime) -> datetime:
    return month.replace(year=month.year + month.month // 12, month=month.month % 12 + 1)


# ── setting a project's quotas ──


class ProjectQuotas(msgspec.Struct, frozen=True, kw_only=True):
    object: str = "project.quotas"
    project_id: str
    tokens_per_day: int | None  # None: the platform's default
    tokens_per_month: int | None


def set_quotas(
    session: Session, principal: Principal, project_id: str, changes: dict[str, int | None]
) -> ProjectQuotas:
    """Change some of a project's quotas (`changes`: quota name → tokens, or None for the
    platform's default; the others are kept). A platform admin's action: a project does not
    raise its own. Audited before → after."""
    authorize(principal, "projects:manage", project_id, lambda p, u: role_of(session, p, u))
    project = project_row(session, project_id)
    for quota, value in changes.items():
        if quota not in QUOTAS:
            raise InvalidInput(f"no quota {quota!r}; quotas: {', '.join(QUOTAS)}", quota)
        KNOWN[quota].check(quota, value)
    before = {q: getattr(project, q) for q in QUOTAS}
    for quota, value in changes.items():
        setattr(project, quota, value)
    after = {q: getattr(project, q) for q in QUOTAS}
    audit.record(session, principal, "project.quotas", project_id, project_id=project_id,
                 before=before, after=after)  # fmt: skip
    return ProjectQuotas(project_id=project_id, **after)


def get_quotas(session: Session, principal: Principal, project_id: str) -> ProjectQuotas:
    authorize(principal, "project:read", project_id, lambda p, u: role_of(session, p, u))
    project = project_row(session, project_id)
    return ProjectQuotas(
        project_id=project_id,
        tokens_per_day=project.tokens_per_day,
        tokens_per_month=project.tokens_per_month,
    )
