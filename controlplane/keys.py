"""API keys: a program's credential for one project, in the `api_keys` table.

A key reads `aim_<key_id>_<secret>`: `key_id` is 8 characters of [a-z0-9] (public: the row's
primary key, shown in listings and logs), `secret` is 32 random bytes in unpadded urlsafe base64
(43 characters). Only sha256(full key) is stored, so a copy of the database lets nobody call the
API; the plaintext is returned once by `create_key` and never again. Authentication looks the
row up by `key_id` and compares the hashes with `hmac.compare_digest` (an unknown id is compared
against a dummy hash), so the time taken does not reveal how much of a guess was right.

A key holds scopes (`access.SCOPES`) and a role, at most its creator's (a viewer's key stays a
viewer's): it may do what both allow. It may expire; it may be revoked, for good.

`KeyAuthenticator` caches successful lookups in memory for `cache_ttl_s` (5 s by default), to
keep the database off the hot path. That is the bound on revocation: a key revoked through
another replica keeps working here for at most `cache_ttl_s`; one revoked through this
process (`forget`) stops at once. `last_used_at` is written at most once a minute per key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

import msgspec
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from controlplane import audit
from controlplane.access import ROLE_ACTIONS, ROLES, SCOPES, Principal, authorize, check_role
from controlplane.db import Database
from controlplane.errors import InvalidInput, NotFound, Unauthenticated
from controlplane.identity import check_name, creator_role, project_row, role_of
from controlplane.models import ApiKey, utcnow

KEY_PREFIX = "aim"
KEY_ID_LENGTH = 8
KEY_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"  # no "_": it separates the parts
SECRET_BYTES = 32
KEY_RE = re.compile(r"aim_([a-z0-9]{8})_([A-Za-z0-9_-]{43})")
MAX_RATE = 10**9  # rpm / tpm: beyond this a limit is a typo, not a limit
LAST_USED_EVERY = timedelta(minutes=1)  # last_used_at is written at most this often per key
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()  # compared against for unknown ids


class InvalidKey(Unauthenticated):
    """A Bearer token that is malformed, unknown, wrong, revoked or expired (401)."""


class KeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What may be shown of a key: no secret and no hash (those stay in the row)."""

    key_id: str  # public part of the key (`aim_<key_id>_<secret>`); safe to log and show
    project_id: str
    scopes: tuple[str, ...]  # access.SCOPES
    role: str  # the most it may do: its creator's role when it was made
    created_at: datetime
    name: str | None = None  # a human label ("ci", "alice's laptop"); not unique
    created_by: str | None = None  # the creator's user id; None: the CLI or a key
    expires_at: datetime | None = None
    last_used_at: datetime | None = None  # to within a minute
    revoked_at: datetime | None = None
    requests_per_minute: int | None = None  # None: the gateway's default
    tokens_per_minute: int | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def public(self) -> dict:
        """JSON-ready view for API responses and `aimass keys list --json`."""
        return msgspec.to_builtins(self)


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def principal_of(record: KeyRecord) -> Principal:
    return Principal(
        "key", record.key_id, project_id=record.project_id, role=record.role, scopes=record.scopes
    )


# ── the service: create, list, get, revoke ──


def create_key(
    s: Session,
    principal: Principal,
    project_id: str,
    scopes: Iterable[str],
    *,
    role: str | None = None,
    name: str | None = None,
    expires_at: datetime | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
) -> tuple[KeyRecord, str]:
    """A new key of `project_id`: its record, and the plaintext, which is stored nowhere and
    cannot be shown again. `role` defaults to the creator's role, and may not exceed it."""
    authorize(principal, "keys:create", project_id, lambda p, u: role_of(s, p, u))
    project_row(s, project_id)
    most = creator_role(s, principal, project_id)
    role = check_role(role or most)
    if ROLES.index(role) > ROLES.index(most):
        raise InvalidInput(f"role {role!r} exceeds the creator's role {most!r}", "role")
    now = utcnow()
    if expires_at is not None and expires_at <= now:
        raise InvalidInput(
            f"expires_at {expires_at.isoformat()} is not in the future", "expires_at"
        )
    row = ApiKey(
        key_id=_new_key_id(s),
        project_id=project_id,
        name=None if name is None else check_name("name", name),
        scopes=list(_within_creator(principal, check_scopes(scopes))),
        role=role,
        created_by=principal.id if principal.kind == "user" else None,
        created_at=now,
        expires_at=expires_at,
        requests_per_minute=check_rate("rpm", rpm),
        tokens_per_minute=check_rate("tpm", tpm),
    )
    plaintext = f"{KEY_PREFIX}_{row.key_id}_{_secret()}"
    row.key_sha256 = hash_key(plaintext)
    s.add(row)
    record = to_record(row)
    audit.record(s, principal, "key.create", row.key_id, project_id=project_id,
                 after=record.public())  # fmt: skip
    return record, plaintext


def list_keys(s: Session, principal: Principal, project_id: str) -> list[KeyRecord]:
    """The project's keys, active and revoked, oldest first."""
    authorize(principal, "keys:manage", project_id, lambda p, u: role_of(s, p, u))
    rows = s.scalars(
        select(ApiKey).where(ApiKey.project_id == project_id).order_by(ApiKey.created_at)
    )
    return [to_record(r) for r in rows]


def get_key(s: Session, principal: Principal, project_id: str, key_id: str) -> KeyRecord:
    authorize(principal, "keys:manage", project_id, lambda p, u: role_of(s, p, u))
    return to_record(_row(s, project_id, key_id))


def revoke_key(s: Session, principal: Principal, project_id: str, key_id: str) -> KeyRecord:
    """Revoke a key for good (again: a no-op that keeps the first time). Through the gateway,
    call `KeyAuthenticator.forget` after the commit so this process stops trusting it at once."""
    authorize(principal, "keys:manage", project_id, lambda p, u: role_of(s, p, u))
    row = _row(s, project_id, key_id, lock=True)
    if row.revoked_at is None:
        before = to_record(row).public()
        row.revoked_at = utcnow()
        audit.record(s, principal, "key.revoke", key_id, project_id=project_id, before=before,
                     after=to_record(row).public())  # fmt: skip
    return to_record(row)


def project_of_key(s: Session, key_id: str) -> str:
    """The project of the key `key_id` (for the operator, who names a key by its id alone)."""
    project_id = s.scalar(select(ApiKey.project_id).where(ApiKey.key_id == key_id))
    if project_id is None:
        raise NotFound(f"no API key with id {key_id!r}", "key_id")
    return project_id


def _row(s: Session, project_id: str, key_id: str, lock: bool = False) -> ApiKey:
    query = select(ApiKey).where(ApiKey.key_id == key_id, ApiKey.project_id == project_id)
    row = s.scalar(query.with_for_update() if lock else query)
    if row is None:
        raise NotFound(f"no API key {key_id!r} in project {project_id!r}", "key_id")
    return row


def _new_key_id(s: Session) -> str:
    for _ in range(5):  # 36^8 ids: a collision is rare, and the primary key would catch it
        key_id = "".join(secrets.choice(KEY_ID_ALPHABET) for _ in range(KEY_ID_LENGTH))
        if s.get(ApiKey, key_id) is None:
            return key_id
    raise RuntimeError("no free key id after 5 draws")  # 36^8 ids: not by chance


def _secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)  # 43 characters, unpadded


def to_record(row: ApiKey) -> KeyRecord:
    return KeyRecord(
        key_id=row.key_id,
        project_id=row.project_id,
        scopes=tuple(row.scopes),
        role=row.role,
        created_at=row.created_at,
        name=row.name,
        created_by=row.created_by,
        expires_at=row.expires_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
        requests_per_minute=row.requests_per_minute,
        tokens_per_minute=row.tokens_per_minute,
    )


# ── checks of input ──


def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    if isinstance(scopes, str):  # "inference" would otherwise become i, n, f, ...
        scopes = [scopes]
    result = tuple(dict.fromkeys(scopes))
    known = ", ".join(SCOPES)
    if not result:
        raise InvalidInput(f"scopes must name at least one scope; known: {known}", "scopes")
    for scope in result:
        if scope not in SCOPES:
            raise InvalidInput(f"unknown scope {scope!r} in scopes; known: {known}", "scopes")
    return result


def _within_creator(principal: Principal, scopes: tuple[str, ...]) -> tuple[str, ...]:
    """A key makes keys with at most its own scopes: an `admin` key mints no `train` key."""
    beyond = [s for s in scopes if principal.kind == "key" and s not in principal.scopes]
    if beyond:
        raise InvalidInput(
            f"scopes {', '.join(repr(s) for s in beyond)} exceed those of the creating API key "
            f"{principal.id} ({', '.join(principal.scopes)})",
            "scopes",
        )
    return scopes


def check_rate(field: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RATE:
        raise InvalidInput(
            f"{field} must be an integer in 1..{MAX_RATE}, or unset for the default "
            f"(got {value!r})",
            field,
        )
    return value


def least_role_for(scopes: Iterable[str]) -> str:
    """The least role under which every action of `scopes` is allowed."""
    wanted = frozenset().union(*(SCOPES[s][1] for s in scopes))
    return next(r for r in ROLES if wanted <= ROLE_ACTIONS[r])


# ── authentication, with a short cache ──


class KeyAuthenticator:
    """Turns a Bearer token into its key's record, or raises `InvalidKey`."""

    def __init__(
        self,
        db: Database,
        *,
        cache_ttl_s: float = 5.0,  # the revocation bound across replicas; 0 disables the cache
        clock: Callable[[], float] = time.monotonic,  # the cache's time; tests pass a fake one
        now: Callable[[], datetime] = utcnow,  # wall time: expiry and last_used_at
    ):
        self.db, self.cache_ttl_s, self._clock, self._now = db, cache_ttl_s, clock, now
        self._cache: dict[str, tuple[str, KeyRecord, float]] = {}  # id -> (hash, record, until)
        self._lock = threading.Lock()

    def cached(self, plaintext: str) -> KeyRecord | None:
        """The record if this key was authenticated less than `cache_ttl_s` ago; no I/O, so the
        event loop may call it. Expiry is checked again: a cached key expires on time."""
        match = KEY_RE.fullmatch(plaintext)
        if match is None:
            return None
        with self._lock:
            hit = self._cache.get(match.group(1))
        if hit is None or hit[2] <= self._clock():
            return None
        if not hmac.compare_digest(hit[0], hash_key(plaintext)):
            return None
        return _usable(hit[1], self._now())

    def authenticate(self, plaintext: str) -> KeyRecord:
        """The key's record; reads the database unless `cached` knows it (blocking I/O)."""
        if (record := self.cached(plaintext)) is not None:
            return record
        match = KEY_RE.fullmatch(plaintext)
        key_id = match.group(1) if match else ""
        with self.db.session() as s:
            row = s.get(ApiKey, key_id) if match else None
            stored = row.key_sha256 if row is not None else _DUMMY_HASH
            if not hmac.compare_digest(stored, hash_key(plaintext)) or row is None:
                raise InvalidKey("invalid API key: send 'Authorization: Bearer aim_...'")
            now = self._now()
            record = _usable(to_record(row), now)
            if row.last_used_at is None or now - row.last_used_at >= LAST_USED_EVERY:
                s.execute(update(ApiKey).where(ApiKey.key_id == key_id).values(last_used_at=now))
        if self.cache_ttl_s > 0:
            with self._lock:
                until = self._clock() + self.cache_ttl_s
                self._cache[key_id] = (stored, record, until)
        return record

    def revoke(self, principal: Principal, project_id: str, key_id: str) -> KeyRecord:
        """`revoke_key` in its own transaction, then `forget`: immediate in this process."""
        with self.db.session() as s:
            record = revoke_key(s, principal, project_id, key_id)
        self.forget(key_id)
        return record

    def forget(self, key_id: str) -> None:
        """Stop trusting a cached lookup of `key_id` (after revoking it through this process)."""
        with self._lock:
            self._cache.pop(key_id, None)


def _usable(record: KeyRecord, now: datetime) -> KeyRecord:
    if record.revoked_at is not None:
        raise InvalidKey(f"API key {record.key_id} was revoked at {record.revoked_at.isoformat()}")
    if record.expires_at is not None and record.expires_at <= now:
        raise InvalidKey(f"API key {record.key_id} expired at {record.expires_at.isoformat()}")
    return record
