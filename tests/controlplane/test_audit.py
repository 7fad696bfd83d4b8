"""Reading the audit log on SQLite and PostgreSQL: newest first, filters and paging; a project's
admins see its entries, other projects' admins get 404, viewers 403, platform admins all."""

from __future__ import annotations

from datetime import timedelta

import pytest

from controlplane import audit
from controlplane.access import CLI
from controlplane.errors import Forbidden, InvalidInput, NotFound
from controlplane.models import utcnow
from tests.controlplane.rows import add_person, add_project, key_of


def _entries(db, project_id, n, action="member.add"):
    with db.session() as s:
        for i in range(n):
            audit.record(s, CLI, action, f"user_{i}", project_id=project_id, after={"i": i})


def _list(db, who, **kw):
    with db.session() as s:
        return audit.list_audit(s, who, **kw)


def test_newest_first_with_filters_and_paging(db):
    a = add_project(db, "a")
    _entries(db, a, 3)
    _entries(db, a, 2, action="key.revoke")
    _entries(db, None, 1, action="setting.set")
    everything = _list(db, CLI)
    assert [e.action for e in everything][:3] == ["setting.set", "key.revoke", "key.revoke"]
    assert [e.id for e in everything] == sorted((e.id for e in everything), reverse=True)
    assert len(_list(db, CLI, project_id=a)) == 5
    assert len(_list(db, CLI, action="member.add")) == 3
    assert len(_list(db, CLI, actor="cli")) == 6 and _list(db, CLI, actor="key:x") == []
    first = _list(db, CLI, project_id=a, limit=2)
    rest = _list(db, CLI, project_id=a, after_id=first[-1].id)
    assert [e.id for e in first + rest] == [e.id for e in _list(db, CLI, project_id=a)]
    assert _list(db, CLI, since=utcnow() + timedelta(seconds=1)) == []
    assert len(_list(db, CLI, until=utcnow() + timedelta(seconds=1))) == 6


def test_project_admins_see_their_project_only(db):
    a, b = add_project(db, "a"), add_project(db, "b")
    _entries(db, a, 2)
    _entries(db, b, 1)
    _entries(db, None, 1, action="setting.set")
    admin_a = add_person(db, {a: "admin"})
    assert {e.project_id for e in _list(db, admin_a)} == {a}
    assert len(_list(db, admin_a, project_id=a)) == 2
    with pytest.raises(NotFound):
        _list(db, admin_a, project_id=b)
    assert {e.project_id for e in _list(db, key_of(a))} == {a}
    with pytest.raises(NotFound):
        _list(db, key_of(a), project_id=b)


def test_viewers_and_developers_may_not_read_the_audit_log(db):
    a = add_project(db, "a")
    _entries(db, a, 1)
    for role in ("viewer", "developer"):
        person = add_person(db, {a: role})
        with pytest.raises(Forbidden):
            _list(db, person, project_id=a)
        with pytest.raises(Forbidden, match="administers no project"):
            _list(db, person)
    with pytest.raises(Forbidden, match="scopes are inference"):
        _list(db, key_of(a, "admin", ("inference",)), project_id=a)


def test_limit_is_bounded(sqlite_db):
    for limit in (0, 1001):
        with pytest.raises(InvalidInput, match=r"limit = .* 1\.\.1000") as e:
            _list(sqlite_db, CLI, limit=limit)
        assert e.value.param == "limit"
