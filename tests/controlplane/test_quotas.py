"""Project token quotas on SQLite and PostgreSQL: refused once used up, naming the quota, the
figures and the reset time; unflushed tokens count; the platform default applies to a project
that sets none; the cache re-reads within its bound. Time is a parameter: no sleeps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from controlplane import settings
from controlplane.access import CLI
from controlplane.errors import Forbidden, InvalidInput, QuotaExceeded
from controlplane.models import AuditEntry
from controlplane.quotas import Quotas, get_quotas, set_quotas
from controlplane.settings import SettingsCache
from controlplane.usage import UsageRecorder
from tests.controlplane.rows import add_person, add_project, key_of

NOW = datetime(2026, 12, 31, 15, 0, tzinfo=UTC)


class Time:
    """The wall clock (which day it is) and the monotonic clock (cache ages), advanced by hand."""

    def __init__(self):
        self.at, self.mono = NOW, 0.0

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)
        self.mono += seconds


@pytest.fixture
def time():
    return Time()


def _quotas(db, time, recorder=None):
    cache = SettingsCache(db, clock=lambda: time.mono)
    return Quotas(db, cache, recorder, ttl_s=2.0, clock=lambda: time.mono, now=lambda: time.at)


def test_a_used_up_day_quota_is_refused_until_midnight(db, time):
    project = add_project(db, "a", tokens_per_day=100)
    recorder = UsageRecorder(db, now=lambda: time.at)
    quotas = _quotas(db, time, recorder)
    quotas.check(project)
    recorder.record(project, "k1", "tiny", 60, 39)  # 99: one token left
    quotas.check(project)
    recorder.record(project, "k1", "tiny", 1, 0)
    with pytest.raises(QuotaExceeded) as e:
        quotas.check(project)  # unflushed tokens count
    assert e.value.quota == "tokens_per_day"
    assert e.value.resets_at == datetime(2027, 1, 1, tzinfo=UTC)
    assert "used 100 tokens of its tokens_per_day quota of 100" in str(e.value)
    assert "resets at 2027-01-01T00:00:00Z" in str(e.value)
    recorder.flush()
    with pytest.raises(QuotaExceeded):
        quotas.check(project)  # flushed: the same tokens, from the table now
    time.advance(9 * 3600)  # past midnight UTC
    quotas.check(project)


def test_a_month_quota_resets_on_the_first(db, time):
    project = add_project(db, "a", tokens_per_month=50)
    recorder = UsageRecorder(db, now=lambda: time.at - timedelta(days=3))  # earlier this month
    recorder.record(project, "", "tiny", 50, 0)
    recorder.flush()
    with pytest.raises(QuotaExceeded) as e:
        _quotas(db, time).check(project)
    assert e.value.quota == "tokens_per_month"
    assert e.value.resets_at == datetime(2027, 1, 1, tzinfo=UTC)


def test_other_replicas_tokens_count_within_the_cache_bound(db, time):
    project = add_project(db, "a", tokens_per_day=10)
    quotas = _quotas(db, time)
    quotas.check(project)
    other = UsageRecorder(db, now=lambda: time.at)  # another replica
    other.record(project, "k1", "tiny", 10, 0)
    other.flush()
    time.mono += 1.9
    quotas.check(project)  # cached sums: within the stated 2 s
    time.mono += 0.1
    with pytest.raises(QuotaExceeded):
        quotas.check(project)


def test_the_platform_default_applies_to_a_project_without_its_own(db, time):
    limited, own = add_project(db, "a"), add_project(db, "b", tokens_per_day=1000)
    with db.session() as s:
        settings.set_value(s, CLI, "tokens_per_day", 5)
    recorder = UsageRecorder(db, now=lambda: time.at)
    for p in (limited, own):
        recorder.record(p, "k1", "tiny", 5, 0)
    quotas = _quotas(db, time, recorder)
    with pytest.raises(QuotaExceeded, match="of 5;"):
        quotas.check(limited)
    quotas.check(own)


def test_no_quota_no_limit(db, time):
    project = add_project(db, "a")
    recorder = UsageRecorder(db, now=lambda: time.at)
    recorder.record(project, "k1", "tiny", 10**9, 10**9)
    _quotas(db, time, recorder).check(project)
    _quotas(db, time, recorder).check("proj_unknown")


def test_setting_quotas_is_a_platform_admins_audited_action(db):
    project = add_project(db, "a")
    owner = add_person(db, {project: "owner"})
    with db.session() as s:
        set_quotas(s, CLI, project, {"tokens_per_day": 1000})
    with db.session() as s:
        assert get_quotas(s, owner, project).tokens_per_day == 1000
        entry = s.scalars(select(AuditEntry)).one()
    assert (entry.action, entry.project_id, entry.before, entry.after) == (
        "project.quotas",
        project,
        {"tokens_per_day": None, "tokens_per_month": None},
        {"tokens_per_day": 1000, "tokens_per_month": None},
    )
    for who in (owner, key_of(project, "owner")):
        with db.session() as s, pytest.raises(Forbidden):
            set_quotas(s, who, project, {"tokens_per_day": 10**9})
    with db.session() as s, pytest.raises(InvalidInput, match="tokens_per_day = 0"):
        set_quotas(s, CLI, project, {"tokens_per_day": 0})


def test_setting_one_quota_keeps_the_other(sqlite_db):
    project = add_project(sqlite_db, "a", tokens_per_day=10, tokens_per_month=100)
    with sqlite_db.session() as s:
        view = set_quotas(s, CLI, project, {"tokens_per_month": None})
    assert (view.tokens_per_day, view.tokens_per_month) == (10, None)
    with sqlite_db.session() as s, pytest.raises(InvalidInput, match="no quota 'per_year'"):
        set_quotas(s, CLI, project, {"per_year": 1})
