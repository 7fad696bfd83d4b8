"""API keys in the database, on SQLite and PostgreSQL: issue, authenticate (hash at rest,
revoked and expired refused, saying which and when), the cache's revocation bound, roles no
higher than the creator's, last_used_at, the audit trail, and the former key file's import."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text

from controlplane.access import CLI, Principal
from controlplane.errors import Forbidden, InvalidInput, NotFound
from controlplane.identity import create_project
from controlplane.keys import (
    InvalidKey,
    KeyAuthenticator,
    create_key,
    get_key,
    least_role_for,
    list_keys,
    revoke_key,
)
from controlplane.legacy_keys import import_legacy_keys
from controlplane.models import ApiKey, AuditEntry, Member, Project, User, utcnow


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeNow:
    def __init__(self):
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def project(db, name: str = "acme") -> str:
    with db.session() as s:
        return create_project(s, CLI, name).id


def key(db, project_id: str, scopes=("inference",), principal=CLI, **kw):
    with db.session() as s:
        return create_key(s, principal, project_id, scopes, **kw)


def member(db, project_id: str, role: str) -> Principal:
    with db.session() as s:
        user_id = f"user_{role}"
        if s.get(User, user_id) is None:
            s.add(User(id=user_id, email=f"{role}@x.org", display_name=role, password_hash="-",
                       is_admin=False, created_at=utcnow()))  # fmt: skip
            s.flush()
        s.add(Member(project_id=project_id, user_id=user_id, role=role, created_at=utcnow()))
    return Principal("user", user_id)


def test_create_then_authenticate(db):
    p = project(db)
    record, plaintext = key(db, p, ["inference", "models:read"], name="ci", rpm=60, tpm=1000)
    prefix, key_id, secret = plaintext.split("_", 2)
    assert (prefix, key_id, len(secret)) == ("aim", record.key_id, 43)
    auth = KeyAuthenticator(db)
    got = auth.authenticate(plaintext)
    assert got.key_id == record.key_id and got.project_id == p
    assert got.scopes == ("inference", "models:read") and got.role == "owner"
    assert (got.requests_per_minute, got.tokens_per_minute, got.name) == (60, 1000, "ci")
    assert auth.cached(plaintext) == got  # the cached path agrees


def test_hash_at_rest_and_no_secret_in_views_or_audit(db):
    record, plaintext = key(db, project(db))
    secret = plaintext.split("_", 2)[2]
    with db.session() as s:
        row = s.get(ApiKey, record.key_id)
        assert row.key_sha256 == hashlib.sha256(plaintext.encode()).hexdigest()
        stored = [str(v) for r in s.execute(text("SELECT * FROM api_keys")) for v in r]
        entries = s.scalars(select(AuditEntry).where(AuditEntry.action == "key.create")).all()
    assert not any(secret in v for v in stored)
    assert len(entries) == 1 and entries[0].target == record.key_id
    assert secret not in json.dumps(entries[0].after) and row.key_sha256 not in str(
        entries[0].after
    )
    assert secret not in str(record.public()) and "sha256" not in str(record.public())


def test_wrong_malformed_unknown_revoked_and_expired_are_refused(db):
    p = project(db)
    record, plaintext = key(db, p)
    wrong = plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")
    unknown = "aim_zzzzzzzz_" + plaintext.split("_", 2)[2]
    auth = KeyAuthenticator(db, cache_ttl_s=0)
    for bad in (wrong, unknown, "", "aim_", "sk-123", plaintext + "x", "aix_" + plaintext[4:]):
        with pytest.raises(InvalidKey, match="invalid API key") as e:
            auth.authenticate(bad)
        assert plaintext.split("_", 2)[2] not in str(e.value)  # never echo a secret
    auth.revoke(CLI, p, record.key_id)
    with pytest.raises(InvalidKey, match=f"API key {record.key_id} was revoked at 20"):
        auth.authenticate(plaintext)

    now = FakeNow()
    now.now = utcnow()
    expiring, plaintext = key(db, p, expires_at=now.now + timedelta(hours=1))
    auth = KeyAuthenticator(db, now=now)
    auth.authenticate(plaintext)  # cached now
    now.now += timedelta(hours=1)
    with pytest.raises(InvalidKey, match=f"API key {expiring.key_id} expired at 20"):
        auth.authenticate(plaintext)  # the cached record expires on time too


def test_revocation_reaches_another_replica_within_the_cache_ttl(db):
    p = project(db)
    record, plaintext = key(db, p)
    clock = FakeClock()
    replica, other = KeyAuthenticator(db, clock=clock), KeyAuthenticator(db)
    replica.authenticate(plaintext)  # cached
    other.revoke(CLI, p, record.key_id)
    assert replica.authenticate(plaintext).key_id == record.key_id  # trusted for <= the TTL ...
    clock.now += 5.0
    with pytest.raises(InvalidKey, match="revoked"):  # ... then the revocation holds
        replica.authenticate(plaintext)


def test_last_used_at_is_written_at_most_once_a_minute(db):
    record, plaintext = key(db, project(db))
    now = FakeNow()
    auth = KeyAuthenticator(db, cache_ttl_s=0, now=now)

    def last_used():
        with db.session() as s:
            return s.get(ApiKey, record.key_id).last_used_at

    assert last_used() is None
    auth.authenticate(plaintext)
    first = now.now
    assert last_used() == first
    now.now += timedelta(seconds=59)
    auth.authenticate(plaintext)
    assert last_used() == first
    now.now += timedelta(seconds=1)
    auth.authenticate(plaintext)
    assert last_used() == now.now


def test_a_key_role_is_at_most_its_creators(db):
    p = project(db)
    developer = member(db, p, "developer")
    record, _ = key(db, p, ["inference"], principal=developer)
    assert record.role == "developer" and record.created_by == developer.id
    with pytest.raises(InvalidInput, match="role 'admin' exceeds the creator's role"):
        key(db, p, ["inference"], principal=developer, role="admin")
    with pytest.raises(Forbidden, match="viewer may not keys:create"):
        key(db, p, ["inference"], principal=member(db, p, "viewer"))
    with pytest.raises(NotFound):  # a stranger: the project looks absent
        key(db, project(db, "other"), ["inference"], principal=developer)
    viewer_key = Principal("key", "k1", project_id=p, role="viewer", scopes=("admin",))
    with pytest.raises(Forbidden, match="may not keys:create"):
        key(db, p, ["inference"], principal=viewer_key)


def test_list_get_revoke_are_for_project_admins(db):
    p, q = project(db), project(db, "other")
    mine, _ = key(db, p)
    theirs, _ = key(db, q)
    admin, developer = member(db, p, "admin"), member(db, p, "developer")
    with db.session() as s:
        assert [k.key_id for k in list_keys(s, admin, p)] == [mine.key_id]
        assert get_key(s, admin, p, mine.key_id).key_id == mine.key_id
        with pytest.raises(NotFound):  # another project's key, asked for under this one
            get_key(s, admin, p, theirs.key_id)
        with pytest.raises(Forbidden):
            list_keys(s, developer, p)
        revoked = revoke_key(s, admin, p, mine.key_id)
        again = revoke_key(s, admin, p, mine.key_id)  # a no-op: keeps the first time
    assert revoked.revoked_at == again.revoked_at is not None
    with db.session() as s:
        actions = s.scalars(select(AuditEntry.action).where(AuditEntry.target == mine.key_id))
        assert sorted(actions) == ["key.create", "key.revoke"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scopes": []}, "at least one scope"),
        ({"scopes": ["inferense"]}, "unknown scope 'inferense'.*known: inference"),
        ({"name": " x"}, "surrounding spaces"),
        ({"name": "x" * 101}, "at most 100 characters"),
        ({"rpm": 0}, r"rpm must be an integer in 1\.\..*got 0"),
        ({"tpm": -5}, r"tpm must be an integer in 1\.\..*got -5"),
        ({"role": "boss"}, "'boss' is not a role"),
        ({"expires_at": datetime(2020, 1, 1, tzinfo=UTC)}, "is not in the future"),
    ],
)
def test_create_validates_inputs(db, kwargs, message):
    p = project(db)
    args = {"scopes": ["inference"]} | kwargs
    with pytest.raises(InvalidInput, match=message):
        key(db, p, **args)


def test_least_role_for_scopes():
    assert least_role_for(["models:read"]) == "viewer"
    assert least_role_for(["inference", "train"]) == "developer"
    assert least_role_for(["models:write"]) == least_role_for(["admin"]) == "admin"


def test_concurrent_creators(db):
    p = project(db)

    def work():
        for _ in range(5):
            key(db, p)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with db.session() as s:
        assert len(list_keys(s, CLI, p)) == 20


# ── the former key file ──

# the schema gateway/auth/service.py wrote before the control plane existed
LEGACY_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY, key_sha256 TEXT NOT NULL, project TEXT NOT NULL, name TEXT,
    scopes TEXT NOT NULL, created_at TEXT NOT NULL, revoked_at TEXT,
    requests_per_minute INTEGER, tokens_per_minute INTEGER
);
CREATE INDEX IF NOT EXISTS api_keys_project ON api_keys (project);
"""


def legacy_file(path, keys: list[tuple]) -> None:
    """`keys`: (key_id, project, scopes, revoked, rpm), written as the old KeyStore wrote."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(LEGACY_SCHEMA)
    for key_id, project_name, scopes, revoked, rpm in keys:
        plaintext = f"aim_{key_id}_" + "s" * 43
        now = datetime.now(UTC).replace(microsecond=0).isoformat()
        con.execute(
            "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key_id, hashlib.sha256(plaintext.encode()).hexdigest(), project_name, "old",
             json.dumps(scopes), now, now if revoked else None, rpm, None),
        )  # fmt: skip
    con.close()


def test_the_former_key_file_is_imported_once_and_nothing_is_lost(db, tmp_path):
    path = tmp_path / "gateway.db"
    legacy_file(path, [("aaaaaaaa", "acme", ["inference"], False, 60),
                       ("bbbbbbbb", "acme", ["admin"], False, None),
                       ("cccccccc", "alice's team", ["models:read"], True, None)])  # fmt: skip
    project(db, "acme")  # an existing project of the same name is reused
    assert import_legacy_keys(db, path) == ["aaaaaaaa", "bbbbbbbb", "cccccccc"]
    assert import_legacy_keys(db, path) == []  # idempotent
    legacy_file(path, [("dddddddd", "new", ["inference"], False, None)])  # one more, later
    assert import_legacy_keys(db, path) == ["dddddddd"]

    auth = KeyAuthenticator(db, cache_ttl_s=0)
    a = auth.authenticate("aim_aaaaaaaa_" + "s" * 43)  # the plaintext its owner holds
    assert (a.role, a.requests_per_minute, a.name) == ("developer", 60, "old")
    assert auth.authenticate("aim_bbbbbbbb_" + "s" * 43).role == "admin"
    with pytest.raises(InvalidKey, match="revoked"):
        auth.authenticate("aim_cccccccc_" + "s" * 43)
    with db.session() as s:
        assert s.scalar(select(ApiKey).where(ApiKey.key_id == "aaaaaaaa")).created_at.tzinfo
        names = sorted(s.scalars(select(Project.name)))
        assert names == ["acme", "alice's team", "new"]
        assert len(s.scalars(select(ApiKey)).all()) == 4
        imports = s.scalars(select(AuditEntry).where(AuditEntry.action == "keys.import")).all()
    assert [e.after["keys"] for e in imports] == [["aaaaaaaa", "bbbbbbbb", "cccccccc"],
                                                  ["dddddddd"]]  # fmt: skip
    assert imports[0].after["projects_created"] == ["alice's team"]


def test_no_former_key_file_imports_nothing(db, tmp_path):
    assert import_legacy_keys(db, tmp_path / "absent.db") == []
    sqlite3.connect(tmp_path / "empty.db").close()
    assert import_legacy_keys(db, tmp_path / "empty.db") == []
