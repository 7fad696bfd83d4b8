"""Databases for control-plane tests: a fresh SQLite file, and a fresh PostgreSQL schema on the
server at $AIMASS_TEST_POSTGRES (default postgresql://postgres@127.0.0.1:5432/test) when one
answers; tests that need it skip, saying so, when none does."""

from __future__ import annotations

import argparse
import os
import secrets

import pytest
from sqlalchemy import create_engine, text

from controlplane import cli as controlplane_cli
from controlplane.db import Database, normalize_url

POSTGRES = os.environ.get("AIMASS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def sqlite_db(tmp_path):
    db = Database.open(f"sqlite:///{tmp_path / 'aimass.db'}")
    db.upgrade()
    yield db
    db.close()


@pytest.fixture
def postgres_url():
    """The URL of an empty schema of its own on the test PostgreSQL, dropped afterwards."""
    admin = create_engine(normalize_url(POSTGRES), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text("SELECT 1"))
    except Exception as e:
        admin.dispose()
        pytest.skip(f"no PostgreSQL at {POSTGRES} ({type(e).__name__}); set AIMASS_TEST_POSTGRES")
    schema = "t_" + secrets.token_hex(6)
    with admin.connect() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    yield f"{POSTGRES}?options=-csearch_path%3D{schema}"
    with admin.connect() as c:
        c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """The same test on both backends, migrated to head."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'aimass.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    database = Database.open(url)
    database.upgrade()
    yield database
    database.close()


def aimass(capsys, *argv: str) -> tuple[int, str, str]:
    """`aimass ARGV` through the control plane's own sub-commands, as `aimass` builds its parser:
    (exit code, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="aimass")
    controlplane_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err
