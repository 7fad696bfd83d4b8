"""API keys: issuing, authenticating, hashing at rest, scopes, several stores, the CLI."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

import pytest

from gateway.auth import (
    SCOPES,
    InvalidKey,
    KeyInputError,
    KeyStore,
    MissingKey,
    PermissionDenied,
    UnknownKeyId,
    parse_bearer,
    require_scope,
)
from gateway.auth.cli import register_keys_cli


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "home" / "gateway.db"


@pytest.fixture
def store(db):
    s = KeyStore(db)
    yield s
    s.close()


def test_create_then_authenticate(store):
    record, key = store.create("acme", ["inference", "models:read"], name="ci", rpm=60, tpm=1000)
    prefix, key_id, secret = key.split("_", 2)
    assert (prefix, key_id, len(secret)) == ("aim", record.key_id, 43)
    got = store.authenticate(key)
    assert got == record
    assert got.scopes == ("inference", "models:read")
    assert (got.requests_per_minute, got.tokens_per_minute, got.name) == (60, 1000, "ci")
    assert store.authenticate(key) == record  # the cached path agrees


def test_wrong_secret_malformed_unknown_and_revoked_are_invalid(store):
    record, key = store.create("acme", ["inference"])
    wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
    unknown = "aim_zzzzzzzz_" + key.split("_", 2)[2]
    for bad in (wrong, unknown, "", "aim_", "sk-123", key + "x", key.replace("aim_", "aix_")):
        with pytest.raises(InvalidKey) as e:
            store.authenticate(bad)
        assert key.split("_", 2)[2] not in str(e.value)  # never echo a secret
    store.revoke(record.key_id)
    with pytest.raises(InvalidKey, match="revoked"):
        store.authenticate(key)


def test_hash_at_rest(db, store):
    record, key = store.create("acme", ["inference"])
    secret = key.split("_", 2)[2]
    stored = b"".join(p.read_bytes() for p in db.parent.iterdir() if p.name.startswith(db.name))
    assert record.key_id.encode() in stored  # the row is there ...
    assert key.encode() not in stored and secret.encode() not in stored  # ... not the secret
    assert "sha256" not in str(record.public()) and secret not in str(record.public())


def test_scopes(store):
    record, _ = store.create("acme", ["inference"])
    require_scope(record, "inference")
    with pytest.raises(PermissionDenied, match="'admin'") as e:
        require_scope(record, "admin")
    assert e.value.scope == "admin"
    with pytest.raises(KeyInputError, match="unknown scope 'inferense'.*known: inference"):
        store.create("acme", ["inferense"])
    with pytest.raises(KeyInputError, match="at least one scope"):
        store.create("acme", [])
    assert store.create("acme", "admin")[0].scopes == ("admin",)  # one scope as a string
    assert set(SCOPES) >= {"inference", "models:read", "admin"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"project": ""}, "project must be a non-empty name"),
        ({"project": " acme"}, "surrounding spaces"),
        ({"project": "x" * 101}, "at most 100 characters"),
        ({"rpm": 0}, r"rpm must be an integer >= 1.*got 0"),
        ({"tpm": -5}, r"tpm must be an integer >= 1.*got -5"),
    ],
)
def test_create_validates_inputs(store, kwargs, message):
    args = {"project": "acme", "scopes": ["inference"]} | kwargs
    with pytest.raises(KeyInputError, match=message):
        store.create(**args)


def test_two_stores_share_one_file(db):
    a, b = KeyStore(db), KeyStore(db)
    record, key = a.create("acme", ["inference"])
    assert b.authenticate(key) == record
    assert [r.key_id for r in b.list("acme")] == [record.key_id]
    assert b.count() == 1 and b.list("other") == []
    a.close()
    b.close()


def test_concurrent_writers_on_one_file(db):
    KeyStore(db).close()  # create the tables before the race

    def work():
        s = KeyStore(db)
        for _ in range(10):
            s.create("acme", ["inference"])
        s.close()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert KeyStore(db).count("acme") == 40


def test_revocation_reaches_other_stores_within_the_cache_ttl(db):
    clock = FakeClock()
    gateway = KeyStore(db, cache_ttl_s=5.0, clock=clock)
    admin = KeyStore(db)
    record, key = admin.create("acme", ["inference"])
    gateway.authenticate(key)  # now cached
    admin.revoke(record.key_id)
    assert gateway.authenticate(key) == record  # still trusted for at most cache_ttl_s ...
    clock.now += 5.0
    with pytest.raises(InvalidKey, match="revoked"):  # ... then the revocation holds
        gateway.authenticate(key)
    assert admin.count() == 0 and admin.count(include_revoked=True) == 1
    with pytest.raises(UnknownKeyId, match="'nokey123'"):
        admin.revoke("nokey123")


def test_parse_bearer():
    assert parse_bearer("Bearer aim_abc") == "aim_abc"
    assert parse_bearer("bearer  aim_abc ") == "aim_abc"
    for value in (None, "", "   ", "Bearer", "Bearer   "):
        with pytest.raises(MissingKey):
            parse_bearer(value)
    with pytest.raises(MissingKey, match="Bearer scheme") as e:
        parse_bearer("Basic c2VjcmV0")
    assert "c2VjcmV0" not in str(e.value)


# --- the CLI, through a parser built as `aimass` builds its own -----------------------------


@pytest.fixture
def keys_cli(db):
    parser = argparse.ArgumentParser(prog="aimass")
    register_keys_cli(parser.add_subparsers(dest="command", required=True), lambda: db)

    def run(*argv: str) -> int:
        args = parser.parse_args(["keys", *argv])
        return args.func(args)

    return run


def test_cli_create_list_revoke(keys_cli, db, capsys):
    assert keys_cli("create", "--project", "acme", "--scopes", "inference, models:read") == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("aim_") and "will not be shown again" in err and key not in err
    record = KeyStore(db).authenticate(key)
    assert record.scopes == ("inference", "models:read")

    assert keys_cli("list", "--project", "acme") == 0
    out, _ = capsys.readouterr()
    assert record.key_id in out and "active" in out and key.split("_", 2)[2] not in out
    assert keys_cli("list", "--json") == 0
    assert key.split("_", 2)[2] not in capsys.readouterr().out

    assert keys_cli("revoke", key) == 0  # a pasted whole key: revoked by its id
    _, err = capsys.readouterr()
    assert record.key_id in err and key.split("_", 2)[2] not in err
    with pytest.raises(InvalidKey):
        KeyStore(db).authenticate(key)


def test_cli_db_option_overrides_the_default(keys_cli, tmp_path, capsys):
    other = tmp_path / "other.db"
    assert keys_cli("create", "--db", str(other), "--project", "p", "--scopes", "admin") == 0
    assert KeyStore(other).count() == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["create", "--project", "acme", "--scopes", "inference,root"], "unknown scope 'root'"),
        (["create", "--project", "acme", "--scopes", "inference", "--rpm", "0"], "rpm must be"),
        (["create", "--project", "", "--scopes", "inference"], "project must be"),
        (["revoke", "nokey123"], "no API key with id 'nokey123'"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(keys_cli, capsys, argv, message):
    assert keys_cli(*argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("aimass: error: ") and message in err
