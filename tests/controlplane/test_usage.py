"""Usage metering on SQLite and PostgreSQL: batched upserts that add up across recorders (two
gateway replicas), nothing lost at close, a failed flush retried, reports by minute/hour/day for
whoever may read them."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from controlplane.access import CLI
from controlplane.db import Database
from controlplane.errors import InvalidInput, NotFound
from controlplane.models import Usage
from controlplane.usage import UsageRecorder, usage_report
from tests.controlplane.rows import add_person, add_project, key_of

T0 = datetime(2026, 12, 2, 10, 59, 30, tzinfo=UTC)


class Clock:
    def __init__(self, at: datetime = T0):
        self.at = at

    def __call__(self) -> datetime:
        return self.at


def rows(db: Database) -> list[tuple]:
    with db.session() as s:
        return [
            (
                u.project_id,
                u.key_id,
                u.model,
                u.minute,
                u.requests,
                u.prompt_tokens,
                u.completion_tokens,
                u.errors,
            )  # fmt: skip
            for u in s.scalars(select(Usage).order_by(Usage.minute, Usage.key_id))
        ]


def test_two_recorders_add_to_the_same_rows(db):
    a, b = UsageRecorder(db, now=Clock()), UsageRecorder(db, now=Clock())
    a.record("proj_a", "k1", "tiny", 10, 5)
    a.record("proj_a", "k1", "tiny", 1, 2, error=True)
    b.record("proj_a", "k1", "tiny", 100, 50)
    assert a.flush() == 1 and b.flush() == 1
    a.record("proj_a", "k1", "tiny", 1000, 500)
    a.flush()
    minute = T0.replace(second=0)
    assert rows(db) == [("proj_a", "k1", "tiny", minute, 4, 1111, 557, 1)]


def test_rows_are_per_project_key_model_and_minute(db):
    clock = Clock()
    recorder = UsageRecorder(db, now=clock)
    recorder.record("proj_a", "", "tiny", 1, 1)  # a person's request
    recorder.record("proj_a", "k1", "tiny", 2, 2)
    recorder.record("proj_a", "k1", "other", 3, 3)
    clock.at += timedelta(seconds=31)  # the next minute
    recorder.record("proj_a", "k1", "tiny", 4, 4)
    recorder.flush()
    got = [(k, m, minute.minute, p) for _, k, m, minute, _, p, _, _ in rows(db)]
    assert sorted(got) == [("", "tiny", 59, 1), ("k1", "other", 59, 3), ("k1", "tiny", 0, 4),
                           ("k1", "tiny", 59, 2)]  # fmt: skip


def test_close_flushes_everything_recorded(db):
    recorder = UsageRecorder(db, flush_every_s=3600, now=Clock())
    recorder.start()
    for _ in range(3):
        recorder.record("proj_a", "k1", "tiny", 7, 3)
    recorder.close()
    assert rows(db)[0][4:] == (3, 21, 9, 0)


def test_a_full_batch_is_written_without_waiting_for_the_tick(db):
    recorder = UsageRecorder(db, flush_every_s=3600, max_rows=2, now=Clock())
    recorder.start()
    try:
        recorder.record("proj_a", "k1", "tiny", 1, 1)
        recorder.record("proj_a", "k2", "tiny", 1, 1)
        deadline = datetime.now(UTC) + timedelta(seconds=10)
        while recorder.flushes == 0:
            assert datetime.now(UTC) < deadline, "a full batch was not flushed"
            time.sleep(0.01)
        assert len(rows(db)) == 2
    finally:
        recorder.close()


def test_a_failed_flush_keeps_its_counts_for_the_next(tmp_path):
    db = Database.open(f"sqlite:///{tmp_path / 'late.db'}")  # no schema yet: writes fail
    try:
        recorder = UsageRecorder(db, now=Clock())
        recorder.record("proj_a", "k1", "tiny", 10, 5)
        with pytest.raises(Exception, match="usage"):
            recorder.flush()
        assert recorder.pending_tokens("proj_a", T0 - timedelta(days=1)) == 15
        recorder.record("proj_a", "k1", "tiny", 1, 1)
        db.upgrade()
        assert recorder.flush() == 1
        assert rows(db)[0][4:] == (2, 11, 6, 0)
        assert recorder.pending_tokens("proj_a", T0 - timedelta(days=1)) == 0
    finally:
        db.close()


def test_pending_tokens_counts_the_project_since_a_time():
    recorder = UsageRecorder(Database.open("sqlite://"), now=Clock())
    recorder.record("proj_a", "k1", "tiny", 10, 5)
    recorder.record("proj_b", "k1", "tiny", 100, 50)
    assert recorder.pending_tokens("proj_a", T0.replace(second=0)) == 15
    assert recorder.pending_tokens("proj_a", T0 + timedelta(minutes=1)) == 0


def _fill(db: Database, *projects: str) -> None:
    """Requests at 10:59, 11:00, 11:30 and the next day 00:15, 2 prompt + 1 completion each."""
    clock = Clock()
    recorder = UsageRecorder(db, now=clock)
    for at in (T0, T0 + timedelta(minutes=1), T0 + timedelta(minutes=31),
               datetime(2026, 12, 3, 0, 15, tzinfo=UTC)):  # fmt: skip
        clock.at = at
        for p in projects:
            recorder.record(p, "k1", "tiny", 2, 1)
    recorder.flush()


DAY = (datetime(2026, 12, 2, tzinfo=UTC), datetime(2026, 12, 4, tzinfo=UTC))


@pytest.mark.parametrize(
    ("group_by", "starts"),
    [
        ("minute", ["10:59", "11:00", "11:30", "00:15"]),
        ("hour", ["10:00", "11:00", "00:00"]),
        ("day", ["00:00", "00:00"]),
    ],
)
def test_report_groups_by_minute_hour_and_day(db, group_by, starts):
    project = add_project(db, "a")
    _fill(db, project)
    with db.session() as s:
        buckets = usage_report(s, CLI, start=DAY[0], end=DAY[1], group_by=group_by)
    assert [datetime.fromtimestamp(b.start_time, UTC).strftime("%H:%M") for b in buckets] == starts
    assert sum(b.requests for b in buckets) == 4
    assert sum(b.prompt_tokens for b in buckets) == 8
    size = {"minute": 60, "hour": 3600, "day": 86400}[group_by]
    assert all(b.end_time - b.start_time == size for b in buckets)
    if group_by == "hour":
        assert [b.requests for b in buckets] == [1, 2, 1]


def test_report_filters_by_key_model_and_time(db):
    project = add_project(db, "a")
    _fill(db, project)
    with db.session() as s:
        day_one = usage_report(s, CLI, start=DAY[0], end=datetime(2026, 12, 3, tzinfo=UTC))
        other_key = usage_report(s, CLI, start=DAY[0], end=DAY[1], key_id="k2")
        other_model = usage_report(s, CLI, start=DAY[0], end=DAY[1], model="big")
    assert [b.requests for b in day_one] == [3]
    assert other_key == [] and other_model == []


def test_a_key_sees_its_project_only(db):
    a, b = add_project(db, "a"), add_project(db, "b")
    _fill(db, a, b)
    with db.session() as s:
        own = usage_report(s, key_of(a), start=DAY[0], end=DAY[1])
        assert {x.project_id for x in own} == {a}
        with pytest.raises(NotFound, match=b):
            usage_report(s, key_of(a), project_id=b, start=DAY[0], end=DAY[1])


def test_a_person_sees_the_projects_they_are_a_member_of(db):
    a, b = add_project(db, "a"), add_project(db, "b")
    _fill(db, a, b)
    viewer = add_person(db, {a: "viewer"})
    with db.session() as s:
        assert {x.project_id for x in usage_report(s, viewer, start=DAY[0], end=DAY[1])} == {a}
        with pytest.raises(NotFound):
            usage_report(s, viewer, project_id=b, start=DAY[0], end=DAY[1])


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"group_by": "week"}, "group_by"),
        ({"end": DAY[0]}, "end_time"),
        ({"group_by": "minute", "end": DAY[0] + timedelta(days=8)}, "start_time"),
    ],
)
def test_report_bounds_name_the_parameter(sqlite_db, kwargs, param):
    args = {"start": DAY[0], "end": DAY[1]} | kwargs
    with sqlite_db.session() as s, pytest.raises(InvalidInput) as e:
        usage_report(s, CLI, **args)
    assert e.value.param == param
