"""The control-plane database: one engine and session factory per process, schema by Alembic.

    db = Database.open(url)        # sqlite:///…/aimass.db (embedded default) or postgresql://…
    db.upgrade()                   # migrations to head; an older database is upgraded in place
    with db.session() as s: …      # a transaction: committed on exit, rolled back on error

SQLite runs in WAL mode (readers go on while one writer writes) with a busy timeout (concurrent
writers wait instead of failing) and foreign keys on. `postgresql://` URLs use psycopg 3.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from aimass_common.settings import default_database
from controlplane.errors import InvalidInput

MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 10_000


def normalize_url(url: str) -> str:
    """`postgresql://` and `postgres://` mean psycopg 3 (SQLAlchemy would pick psycopg2)."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    if not url.startswith(("sqlite:", "postgresql+psycopg:")):
        raise ValueError(
            f"database URL {redact(url)!r} must start with sqlite:/// or postgresql://"
        )
    return url


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for messages and logs: in its user part
    (`user:pw@host`) and in its query (`?password=pw`, as libpq also takes it)."""
    url = _QUERY_PASSWORD.sub(r"\1***", url)
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"


_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


class Database:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, url: str | None = None) -> Database:
        """`url`, else $AIMASS_DATABASE, else $AIMASS_HOME/aimass.db; not yet migrated."""
        url = normalize_url(url or default_database())
        if url.startswith("sqlite:"):
            path = url.removeprefix("sqlite:///")
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"check_same_thread": False})
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
        event.listen(engine, "before_cursor_execute", _refuse_nul)
        return cls(engine)

    @property
    def dialect(self) -> str:
        """ "sqlite" or "postgresql"."""
        return self.engine.dialect.name

    @property
    def url(self) -> str:
        return redact(self.engine.url.render_as_string(hide_password=False))

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as s:
            yield s

    @classmethod
    @contextlib.contextmanager
    def migrated(cls, url: str | None = None) -> Iterator[Database]:
        """`open(url)`, upgraded to the newest schema, closed on exit: what a CLI command
        works on."""
        db = cls.open(url)
        try:
            db.upgrade()
            yield db
        finally:
            db.close()

    def upgrade(self, revision: str = "head") -> None:
        """Run the migrations up to `revision` (several processes may race here: Alembic's
        version row makes the loser's steps no-ops on PostgreSQL; SQLite serializes writers)."""
        with self.engine.begin() as connection:
            config = _alembic_config()
            config.attributes["connection"] = connection
            command.upgrade(config, revision)

    def revision(self) -> str | None:
        """The schema's current revision; None for an empty database."""
        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def is_current(self) -> bool:
        return self.revision() == ScriptDirectory.from_config(_alembic_config()).get_current_head()

    def close(self) -> None:
        self.engine.dispose()


def failure_line(e: Exception) -> str:
    """A database failure (SQLAlchemy's error, its driver's message) as a CLI's one line."""
    return f"database: {type(e).__name__}: {str(e).splitlines()[0]}"


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _refuse_nul(_conn, _cursor, _statement, parameters, _context, executemany) -> None:
    """PostgreSQL cannot store a NUL character in text (it raised a DataError: a 500); refuse
    it on both dialects as the bad input it is, before the statement runs."""
    for row in parameters if executemany else [parameters]:
        values = row.values() if isinstance(row, dict) else row or ()
        for value in values:
            if isinstance(value, str) and "\x00" in value:
                raise InvalidInput(
                    f"the text {value[:100]!r} contains a NUL character (\\x00), which cannot be "
                    "stored"
                )
