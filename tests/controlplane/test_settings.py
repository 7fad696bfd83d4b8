"""Platform settings on SQLite and PostgreSQL: known keys with types and bounds, a platform
admin's change audited before → after, and a cache every replica re-reads within its TTL."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from controlplane import settings
from controlplane.access import CLI
from controlplane.errors import Forbidden, InvalidInput
from controlplane.models import AuditEntry
from controlplane.settings import KNOWN, SettingsCache
from tests.controlplane.rows import add_person, add_project, key_of


def test_defaults_until_set_then_the_value_audited(db):
    with db.session() as s:
        assert settings.get_all(s) == {name: spec.default for name, spec in KNOWN.items()}
        settings.set_value(s, CLI, "requests_per_minute", 60)
    with db.session() as s:
        settings.set_value(s, CLI, "requests_per_minute", 120)
    with db.session() as s:
        assert settings.get_all(s)["requests_per_minute"] == 120
        entries = s.scalars(select(AuditEntry).order_by(AuditEntry.id)).all()
    assert [(e.action, e.target, e.actor, e.before, e.after) for e in entries] == [
        ("setting.set", "requests_per_minute", "cli", {"value": None}, {"value": 60}),
        ("setting.set", "requests_per_minute", "cli", {"value": 60}, {"value": 120}),
    ]


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("requests_per_minute", 0, "out of bounds: 1..1000000"),
        ("requests_per_minute", "60", "must be an integer"),
        ("requests_per_minute", True, "must be an integer"),
        ("upload_max_bytes", 100, "out of bounds: 1024.."),
        ("upload_max_bytes", None, "may not be null"),
        ("default_model", "", "1..200 characters"),
        ("colour", 1, "no setting 'colour'"),
    ],
)
def test_bad_values_name_the_setting_value_and_bounds(sqlite_db, name, value, says):
    with sqlite_db.session() as s, pytest.raises(InvalidInput, match=says) as e:
        settings.set_value(s, CLI, name, value)
    assert e.value.param == name
    with sqlite_db.session() as s:
        assert s.scalars(select(AuditEntry)).all() == []


def test_null_clears_a_nullable_limit(sqlite_db):
    with sqlite_db.session() as s:
        settings.set_value(s, CLI, "tokens_per_day", 1000)
        settings.set_value(s, CLI, "tokens_per_day", None)
        assert settings.get_all(s)["tokens_per_day"] is None


def test_only_platform_admins_change_settings(sqlite_db):
    project = add_project(sqlite_db, "a")
    owner = add_person(sqlite_db, {project: "owner"})
    for who in (owner, key_of(project, "owner")):
        with sqlite_db.session() as s, pytest.raises(Forbidden, match="platform admin"):
            settings.set_value(s, who, "requests_per_minute", 10)


def test_the_cache_applies_a_change_within_its_ttl(db):
    now = [0.0]
    cache = SettingsCache(db, ttl_s=5.0, clock=lambda: now[0])
    assert cache.get("requests_per_minute") is None
    with db.session() as s:  # another replica's change
        settings.set_value(s, CLI, "requests_per_minute", 30)
    now[0] = 4.9
    assert cache.get("requests_per_minute") is None  # still within the bound
    now[0] = 5.0
    assert cache.get("requests_per_minute") == 30


def test_the_cache_refuses_an_unknown_name(sqlite_db):
    with pytest.raises(InvalidInput, match="no setting 'rpm'"):
        SettingsCache(sqlite_db).get("rpm")
