"""Keys of the gateway's former SQLite key file (`$AIMASS_HOME/gateway.db`), moved into the
control-plane database so that every key issued before keeps working.

`import_legacy_keys(db, path)` copies each key the database lacks: the same key id and sha256
(so the plaintext its owner holds still authenticates), name, scopes, limits, creation and
revocation times (a revoked key stays revoked). Its free-text project becomes a project of that
name (created if absent); its role is "admin" for a key with the admin or models:write scope
(which only an admin's key may use), else "developer". Keys the database has already are left
alone, so running it again imports nothing: `aimass serve` and `aimass keys` run it each time
they open the database. One audit entry records each import. The old file is only read.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from controlplane import audit
from controlplane.access import CLI
from controlplane.db import Database
from controlplane.identity import project_by_name
from controlplane.models import ApiKey, Project, new_id, utcnow

log = logging.getLogger(__name__)

_COLUMNS = (
    "key_id, key_sha256, project, name, scopes, created_at, revoked_at, "
    "requests_per_minute, tokens_per_minute"
)


def import_legacy_keys(db: Database, path: Path) -> list[str]:
    """Import the keys of the SQLite file `path` not yet in `db`; their ids (none if the file
    is absent or holds no key table)."""
    rows = _read(path)
    if not rows:
        return []
    for attempt in range(2):
        try:
            return _import(db, path, rows)
        except IntegrityError:  # another process imported the same keys at the same moment
            if attempt:
                raise
    return []


def _read(path: Path) -> list[tuple]:
    if not path.is_file():
        return []
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        found = con.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'api_keys'"
        ).fetchone()
        if found is None:
            return []
        return con.execute(
            f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, key_id"
        ).fetchall()
    finally:
        con.close()


def _import(db: Database, path: Path, rows: list[tuple]) -> list[str]:
    with db.session() as s:
        have = set(s.scalars(select(ApiKey.key_id).where(ApiKey.key_id.in_([r[0] for r in rows]))))
        new = [r for r in rows if r[0] not in have]
        if not new:
            return []
        projects: dict[str, str] = {}
        created = []
        for key_id, sha, project, name, scopes, created_at, revoked_at, rpm, tpm in new:
            if project not in projects:
                row = project_by_name(s, project)
                if row is None:
                    row = Project(id=new_id("proj"), name=project, created_at=utcnow())
                    s.add(row)
                    s.flush()
                    created.append(project)
                projects[project] = row.id
            scope_list = json.loads(scopes)
            s.add(
                ApiKey(
                    key_id=key_id,
                    key_sha256=sha,
                    project_id=projects[project],
                    name=name,
                    scopes=scope_list,
                    role="admin" if {"admin", "models:write"} & set(scope_list) else "developer",
                    created_by=None,
                    created_at=datetime.fromisoformat(created_at),
                    revoked_at=datetime.fromisoformat(revoked_at) if revoked_at else None,
                    requests_per_minute=rpm,
                    tokens_per_minute=tpm,
                )
            )
        imported = [r[0] for r in new]
        audit.record(s, CLI, "keys.import", str(path),
                     after={"keys": imported, "projects_created": created})  # fmt: skip
    log.info("imported %d API keys from %s", len(imported), path)
    return imported
