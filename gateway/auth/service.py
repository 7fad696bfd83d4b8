"""API keys: issue, authenticate, list and revoke them, over one SQLite file.

A key reads `aim_<key_id>_<secret>`: `key_id` is 8 characters of [a-z0-9] (public, the row's
primary key, shown in listings and logs), `secret` is 32 random bytes in unpadded urlsafe
base64 (43 characters). Only sha256(full key) is stored: a copy of the database lets nobody
call the API. Authentication looks the row up by `key_id`, then compares the hashes with
`hmac.compare_digest`, so the time taken does not reveal how much of a guess was right.

The file is shared by every gateway process on a machine (and the `aimass keys` CLI): WAL mode
lets readers go on while one writer writes, and a busy timeout makes concurrent writers wait
instead of failing. Successful lookups are cached in memory for `cache_ttl_s` (5 s by default)
to keep SQLite off the hot path; hence a key revoked by *another* process keeps working in this
one for at most `cache_ttl_s`. A revocation through this store's own `revoke` takes effect at
once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

from gateway.auth.errors import (
    InvalidKey,
    KeyInputError,
    MissingKey,
    PermissionDenied,
    UnknownKeyId,
)
from gateway.auth.schemas import KeyRecord

# The closed set of scopes a key can hold. Scopes do not imply one another ("admin" does not
# grant "inference"): a key states everything it may do, which keeps `require_scope` one line.
SCOPES: dict[str, str] = {
    "inference": "generate text: /v1/completions, /v1/chat/completions",
    "models:read": "list and describe the models served: /v1/models",
    "models:write": "change what is served: load, unload, move aliases, canary splits",
    "admin": "the control plane: projects, members, keys, training jobs",
}

KEY_PREFIX = "aim"
KEY_ID_LENGTH = 8
KEY_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"  # no "_": it separates the parts
SECRET_BYTES = 32
MAX_NAME_LENGTH = 100  # project and key names
_KEY_RE = re.compile(r"aim_([a-z0-9]{8})_([A-Za-z0-9_-]{43})")
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()  # compared against for unknown ids

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    key_sha256 TEXT NOT NULL,           -- hex sha256 of the full plaintext key
    project TEXT NOT NULL,
    name TEXT,
    scopes TEXT NOT NULL,               -- JSON list of strings
    created_at TEXT NOT NULL,           -- ISO 8601, UTC
    revoked_at TEXT,                    -- ISO 8601, UTC; NULL while active
    requests_per_minute INTEGER,        -- NULL: the project's/default limit
    tokens_per_minute INTEGER           -- NULL: the project's/default limit
);
CREATE INDEX IF NOT EXISTS api_keys_project ON api_keys (project);
"""
_COLUMNS = (
    "key_id, project, name, scopes, created_at, revoked_at, requests_per_minute, tokens_per_minute"
)


def parse_bearer(header_value: str | None) -> str:
    """The key from an `Authorization: Bearer <key>` header value; `MissingKey` otherwise.

    The messages never repeat the header: it may hold a secret sent under the wrong scheme."""
    if not header_value or not header_value.strip():
        raise MissingKey("missing API key: send the header 'Authorization: Bearer aim_...'")
    scheme, _, token = header_value.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise MissingKey(
            "the Authorization header must use the Bearer scheme: 'Authorization: Bearer aim_...'"
        )
    token = token.strip()
    if not token:
        raise MissingKey("the Authorization header has no key after 'Bearer'")
    return token


def require_scope(record: KeyRecord, scope: str) -> None:
    """Raise `PermissionDenied` naming `scope` unless the key holds it."""
    if scope not in SCOPES:  # a typo in a route would otherwise deny every key, silently
        raise ValueError(f"unknown scope {scope!r}; known: {', '.join(SCOPES)}")
    if scope not in record.scopes:
        held = ", ".join(record.scopes) or "none"
        raise PermissionDenied(
            f"API key {record.key_id} lacks the scope {scope!r} (it has: {held})", scope
        )


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


class KeyStore:
    """API keys in the SQLite file `path` (created with its folder and tables if absent)."""

    def __init__(
        self,
        path: str | Path,
        *,
        cache_ttl_s: float = 5.0,  # how long a successful lookup is trusted; 0 disables
        clock: Callable[[], float] = time.monotonic,  # for the cache; tests pass a fake one
    ):
        self.path = Path(path)
        self.cache_ttl_s = cache_ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[str, KeyRecord, float]] = {}  # id -> (hash, record, until)
        self._lock = threading.Lock()  # one connection, shared by the threads of this process
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit (isolation_level=None): each statement is its own transaction, and writes
        # that must be atomic open one explicitly. timeout: wait for another process's writer.
        self._db = sqlite3.connect(
            self.path, timeout=10.0, isolation_level=None, check_same_thread=False
        )
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create(
        self,
        project: str,
        scopes: Iterable[str],
        name: str | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new key for `project`: its record and the plaintext, which is not stored anywhere
        and cannot be shown again."""
        fields = dict(
            project=_check_name("project", project),
            scopes=_check_scopes(scopes),
            created_at=datetime.now(UTC).replace(microsecond=0),
            name=None if name is None else _check_name("name", name),
            requests_per_minute=_check_limit("rpm", rpm),
            tokens_per_minute=_check_limit("tpm", tpm),
        )
        for _ in range(5):  # 36^8 ids: a collision is rare, and the primary key catches it
            key_id = "".join(secrets.choice(KEY_ID_ALPHABET) for _ in range(KEY_ID_LENGTH))
            secret = base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).rstrip(b"=")
            plaintext = f"{KEY_PREFIX}_{key_id}_{secret.decode()}"
            record = KeyRecord(key_id=key_id, **fields)
            try:
                with self._lock:
                    self._db.execute(
                        f"INSERT INTO api_keys ({_COLUMNS}, key_sha256) VALUES (?,?,?,?,?,?,?,?,?)",
                        (*_to_row(record), hash_key(plaintext)),
                    )
            except sqlite3.IntegrityError:
                continue
            return record, plaintext
        raise RuntimeError("could not draw an unused key id in 5 tries")  # pragma: no cover

    def authenticate(self, plaintext: str) -> KeyRecord:
        """The record of an active key whose secret matches; `InvalidKey` otherwise."""
        match = _KEY_RE.fullmatch(plaintext or "")
        if match is None:
            raise InvalidKey("malformed API key: expected 'aim_<key id>_<secret>'")
        key_id, digest = match.group(1), hash_key(plaintext)
        now = self._clock()
        cached = self._cache.get(key_id)
        if cached is not None and cached[2] > now:
            stored, record = cached[0], cached[1]
        else:
            with self._lock:
                row = self._db.execute(
                    f"SELECT {_COLUMNS}, key_sha256 FROM api_keys WHERE key_id = ?", (key_id,)
                ).fetchone()
            stored, record = (row[-1], _from_row(row[:-1])) if row else (_DUMMY_HASH, None)
        if not hmac.compare_digest(digest, stored) or record is None:
            raise InvalidKey(f"invalid API key {key_id}: unknown key id or wrong secret")
        if record.revoked_at is not None:
            raise InvalidKey(f"API key {key_id} was revoked at {record.revoked_at.isoformat()}")
        if self.cache_ttl_s > 0:
            if len(self._cache) >= 10_000:  # bound memory under a flood of distinct valid keys
                self._cache.clear()
            self._cache[key_id] = (stored, record, now + self.cache_ttl_s)
        return record

    def get(self, key_id: str) -> KeyRecord:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        if row is None:
            raise UnknownKeyId(f"no API key with id {key_id!r} in {self.path}")
        return _from_row(row)

    def list(self, project: str | None = None) -> list[KeyRecord]:
        """Keys (active and revoked), oldest first; those of `project` if given."""
        query, args = f"SELECT {_COLUMNS} FROM api_keys", ()
        if project is not None:
            query, args = query + " WHERE project = ?", (project,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created_at, key_id", args).fetchall()
        return [_from_row(r) for r in rows]

    def revoke(self, key_id: str) -> KeyRecord:
        """Revoke a key (again: a no-op that keeps the first time); returns its record."""
        now = datetime.now(UTC).replace(microsecond=0).isoformat()
        with self._lock:
            self._db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (now, key_id),
            )
        self._cache.pop(key_id, None)
        return self.get(key_id)

    def count(self, project: str | None = None, *, include_revoked: bool = False) -> int:
        """How many keys there are (active only by default)."""
        where = [] if include_revoked else ["revoked_at IS NULL"]
        args: tuple = ()
        if project is not None:
            where.append("project = ?")
            args = (project,)
        query = "SELECT COUNT(*) FROM api_keys" + (f" WHERE {' AND '.join(where)}" if where else "")
        with self._lock:
            return self._db.execute(query, args).fetchone()[0]


def _check_name(field: str, value: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise KeyInputError(f"{field} must be a non-empty name (got {value!r})")
    if value != value.strip() or len(value) > MAX_NAME_LENGTH:
        raise KeyInputError(
            f"{field} must have no surrounding spaces and at most {MAX_NAME_LENGTH} characters "
            f"(got {value!r}, {len(value)} characters)"
        )
    return value


def _check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    if isinstance(scopes, str):  # "inference" would otherwise become i, n, f, ...
        scopes = [scopes]
    result = tuple(dict.fromkeys(scopes))
    if not result:
        raise KeyInputError(f"scopes must name at least one scope; known: {', '.join(SCOPES)}")
    for scope in result:
        if scope not in SCOPES:
            raise KeyInputError(f"unknown scope {scope!r} in scopes; known: {', '.join(SCOPES)}")
    return result


def _check_limit(field: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KeyInputError(
            f"{field} must be an integer >= 1, or unset for no limit (got {value!r})"
        )
    return value


def _to_row(r: KeyRecord) -> tuple:
    return (
        r.key_id,
        r.project,
        r.name,
        json.dumps(list(r.scopes)),
        r.created_at.isoformat(),
        r.revoked_at.isoformat() if r.revoked_at else None,
        r.requests_per_minute,
        r.tokens_per_minute,
    )


def _from_row(row: tuple) -> KeyRecord:
    key_id, project, name, scopes, created_at, revoked_at, rpm, tpm = row
    return KeyRecord(
        key_id=key_id,
        project=project,
        name=name,
        scopes=tuple(json.loads(scopes)),
        created_at=datetime.fromisoformat(created_at),
        revoked_at=datetime.fromisoformat(revoked_at) if revoked_at else None,
        requests_per_minute=rpm,
        tokens_per_minute=tpm,
    )
