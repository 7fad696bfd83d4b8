"""Usage metering: what each project, key and model used, minute by minute.

The gateway calls `UsageRecorder.record` as each generation ends; the counts gather in memory
(one row per project, key, model and UTC minute) and a background thread writes them every few
seconds, or sooner when the batch grows, as one upsert per row that adds to what is there
(`INSERT … ON CONFLICT DO UPDATE SET n = usage.n + excluded.n`), so several gateway replicas add
to the same rows. A flush that fails keeps its counts for the next one; `close()` flushes what is
left, so a gateway stopped cleanly loses nothing.

`usage_report` reads the rows back in minute, hour or day buckets, for whoever may see them.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta

import msgspec
from sqlalchemy import Select, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from controlplane.access import Principal, authorize
from controlplane.db import Database
from controlplane.errors import InvalidInput
from controlplane.identity import role_of
from controlplane.models import Member, Usage, utcnow

log = logging.getLogger(__name__)

COUNTS = ("requests", "prompt_tokens", "completion_tokens", "errors")
Row = tuple[str, str, str, datetime]  # (project_id, key_id, model, minute)
MODEL_CHARS = Usage.model.type.length


class UsageRecorder:
    """Counts in memory, written to `db` in batches off the request path (thread-safe)."""

    def __init__(
        self,
        db: Database,
        *,
        flush_every_s: float = 2.0,  # the most a count waits in memory while the gateway runs
        max_rows: int = 1000,  # a batch this large is written at once, not at the next tick
        now: Callable[[], datetime] = utcnow,  # when a request ended (its row's minute)
    ):
        if flush_every_s <= 0 or max_rows < 1:
            raise ValueError(
                f"flush_every_s = {flush_every_s} must be > 0 and max_rows = {max_rows} >= 1"
            )
        self.db, self.flush_every_s, self.max_rows, self.now = db, flush_every_s, max_rows, now
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush at a time
        self._pending: dict[Row, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self._writing: dict[Row, list[int]] = {}  # the batch a flush is writing now
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.flushes = 0  # batches written: a reader of the table's sums knows when to re-read

    def record(
        self,
        project_id: str,
        key_id: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        *,
        error: bool = False,
    ) -> None:
        """One request that ended now: `key_id` "" for a person's request. A name longer than
        its column is cut to fit, so one odd name cannot make every later batch fail."""
        row = (project_id, key_id, model[:MODEL_CHARS], _minute(self.now()))
        with self._lock:
            counts = self._pending[row]
            counts[0] += 1
            counts[1] += prompt_tokens
            counts[2] += completion_tokens
            counts[3] += int(error)
            full = len(self._pending) >= self.max_rows
        if full:
            self._wake.set()

    def pending_tokens(self, project_id: str, since: datetime) -> int:
        """Tokens of `project_id` from `since` on that are not in the table yet (including a
        batch being written now: a reader may count it twice for an instant, never zero
        times)."""
        with self._lock:
            rows = [*self._pending.items(), *self._writing.items()]
        return sum(c[1] + c[2] for (p, _, _, m), c in rows if p == project_id and m >= since)

    def flush(self) -> int:
        """Write what is pending now; the number of rows written. On a database error the
        counts go back to pending (added to what came in meanwhile) and the error is raised."""
        with self._flush_lock:
            with self._lock:
                batch, self._pending = self._pending, defaultdict(lambda: [0, 0, 0, 0])
                self._writing = batch
            if not batch:
                return 0
            try:
                with self.db.session() as session:
                    _upsert(session, batch.items())
            except BaseException:
                with self._lock:
                    for row, counts in batch.items():
                        merged = self._pending[row]
                        for i, n in enumerate(counts):
                            merged[i] += n
                    self._writing = {}
                raise
            with self._lock:
                self._writing = {}
                self.flushes += 1
            return len(batch)

    def start(self) -> None:
        """Flush every `flush_every_s` (or when a batch fills) on a thread of its own."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="usage-flush", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the thread and write everything recorded: nothing is lost at a clean stop."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.flush()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_every_s)
            self._wake.clear()
            if self._stop.is_set():
                return  # close() writes the rest
            try:
                self.flush()
            except Exception as e:  # the counts are kept; the next tick tries again
                log.error("usage flush failed, retrying in %.1f s: %s", self.flush_every_s, e)


def _upsert(session: Session, rows: Iterable[tuple[Row, list[int]]]) -> None:
    dialect = {"sqlite": sqlite, "postgresql": postgresql}[session.bind.dialect.name]
    insert = dialect.insert(Usage)
    table = Usage.__table__
    statement = insert.on_conflict_do_update(
        index_elements=[c.name for c in table.primary_key.columns],
        set_={name: table.c[name] + insert.excluded[name] for name in COUNTS},
    )
    values = [
        {
            "project_id": p,
            "key_id": k,
            "model": m,
            "minute": minute,
            **dict(zip(COUNTS, c, strict=True)),
        }
        for (p, k, m, minute), c in rows
    ]
    session.execute(statement, values)


def _minute(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


# ── reading it back ──

BUCKETS = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1), "day": timedelta(days=1)}
MAX_BUCKETS = 10_080  # a week of minutes, 14 months of hours, 27 years of days


class UsageBucket(msgspec.Struct, frozen=True, kw_only=True):
    """What one project's key used of one model in [start_time, end_time) (unix seconds, UTC,
    as the API shows them)."""

    start_time: int
    end_time: int
    project_id: str
    key_id: str  # "" for people's requests
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    errors: int  # requests the engine accepted that ended in an error


def usage_report(
    session: Session,
    principal: Principal,
    *,
    start: datetime,
    end: datetime,
    project_id: str | None = None,
    key_id: str | None = None,
    model: str | None = None,
    group_by: str = "day",
) -> list[UsageBucket]:
    """Usage in [start, end) in `group_by` buckets (UTC), per project, key and model, in time
    order. Without `project_id`: every project a platform admin asks for, a key's own project,
    a person's projects. Buckets with no requests are left out."""
    size = BUCKETS.get(group_by)
    if size is None:
        raise InvalidInput(
            f"group_by {group_by!r} must be one of: {', '.join(BUCKETS)}", "group_by"
        )
    if end <= start:
        raise InvalidInput(f"end_time {end.isoformat()} must be after start_time "
                           f"{start.isoformat()}", "end_time")  # fmt: skip
    if (end - start) / size > MAX_BUCKETS:
        raise InvalidInput(
            f"{start.isoformat()}..{end.isoformat()} is more than {MAX_BUCKETS} {group_by} "
            "buckets; narrow the time range or group by a longer period",
            "start_time",
        )
    query = select(Usage).where(Usage.minute >= start, Usage.minute < end)
    query = _visible(query, session, principal, project_id)
    if key_id is not None:
        query = query.where(Usage.key_id == key_id)
    if model is not None:
        query = query.where(Usage.model == model)
    sums: dict[tuple[datetime, str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for u in session.scalars(query):
        counts = sums[(_bucket(u.minute, group_by), u.project_id, u.key_id, u.model)]
        for i, name in enumerate(COUNTS):
            counts[i] += getattr(u, name)
    return [
        UsageBucket(
            start_time=_unix(at),
            end_time=_unix(at + size),
            project_id=p,
            key_id=k,
            model=m,
            **dict(zip(COUNTS, counts, strict=True)),
        )  # fmt: skip
        for (at, p, k, m), counts in sorted(sums.items())
    ]


def _unix(at: datetime) -> int:
    return int(at.timestamp())


def _visible(
    query: Select, session: Session, principal: Principal, project_id: str | None
) -> Select:
    if project_id is None and principal.is_admin:
        return query
    if project_id is None and principal.kind == "key":
        project_id = principal.project_id
    if project_id is not None:
        authorize(principal, "usage:read", project_id, lambda p, u: role_of(session, p, u))
        return query.where(Usage.project_id == project_id)
    # a person: every project they are a member of (each role may read usage)
    mine = select(Member.project_id).where(Member.user_id == principal.id)
    return query.where(Usage.project_id.in_(mine))


def _bucket(minute: datetime, group_by: str) -> datetime:
    if group_by == "day":
        return minute.replace(hour=0, minute=0)
    if group_by == "hour":
        return minute.replace(minute=0)
    return minute


def parse_time(value: str, field: str) -> datetime:
    """A time as unix seconds ("1796205600") or ISO 8601 ("2026-12-02T10:00:00Z"; UTC when it
    names no zone), for the API's and CLI's time filters."""
    try:
        at = datetime.fromtimestamp(float(value), UTC)
    except ValueError:
        try:
            at = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidInput(
                f"{field} {value!r} is neither unix seconds nor an ISO 8601 time", field
            ) from None
    except (OverflowError, OSError):
        raise InvalidInput(f"{field} {value!r} is out of range", field) from None
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    if not MIN_TIME <= at <= MAX_TIME:
        raise InvalidInput(f"{field} {value!r} is out of bounds: years 2000..2199", field)
    return at


MIN_TIME, MAX_TIME = datetime(2000, 1, 1, tzinfo=UTC), datetime(2200, 1, 1, tzinfo=UTC)
