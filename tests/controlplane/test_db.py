"""The schema comes from the migrations, and they build exactly the ORM's tables."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select

from controlplane.db import Database, normalize_url, redact
from controlplane.models import Base, Project, new_id


def test_migrations_build_exactly_the_models(db):
    with db.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == [], f"models and migrations differ: {diff}"
    assert db.is_current()


def test_upgrade_twice_keeps_the_data(db):
    with db.session() as s:
        s.add(Project(id=new_id("proj"), name="demo", created_at=datetime.now(UTC)))
    db.upgrade()
    with db.session() as s:
        assert s.scalars(select(Project.name)).all() == ["demo"]


def test_empty_database_has_no_revision_until_upgraded(tmp_path):
    database = Database.open(f"sqlite:///{tmp_path / 'x.db'}")
    assert database.revision() is None and not database.is_current()
    database.upgrade()
    assert database.revision() == "0001"
    assert "api_keys" in inspect(database.engine).get_table_names()
    database.close()


def test_sqlite_runs_in_wal_mode_with_foreign_keys(sqlite_db):
    with sqlite_db.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_times_come_back_in_utc(db):
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    with db.session() as s:
        s.add(Project(id="proj_x", name="x", created_at=at))
    with db.session() as s:
        assert s.get(Project, "proj_x").created_at == at


def test_naive_times_are_refused(sqlite_db):
    with pytest.raises(Exception, match="naive datetime"), sqlite_db.session() as s:
        s.add(Project(id="proj_y", name="y", created_at=datetime(2026, 1, 1)))


def test_urls():
    assert normalize_url("postgresql://u@h/d") == "postgresql+psycopg://u@h/d"
    assert normalize_url("postgres://u@h/d") == "postgresql+psycopg://u@h/d"
    with pytest.raises(ValueError, match="must start with sqlite:/// or postgresql://"):
        normalize_url("mysql://root:hunter2@h/d")
    assert "hunter2" not in redact("postgresql://root:hunter2@h/d")
    assert redact("postgresql://root@h/d?sslmode=require&password=hunter2&x=1") == (
        "postgresql://root@h/d?sslmode=require&password=***&x=1"
    )
