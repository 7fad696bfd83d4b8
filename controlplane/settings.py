"""Platform configuration: the settings a platform admin changes at run time, stored in the
database so every gateway replica applies a change without a restart.

    setting                      type        default        bounds               what reads it
    requests_per_minute          int | null  null           1 .. 1,000,000       rate limiter: default per key
    tokens_per_minute            int | null  null           1 .. 1,000,000,000   rate limiter: default per key
    tokens_per_day               int | null  null           1 .. 10^12           quotas: default per project
    tokens_per_month             int | null  null           1 .. 10^13           quotas: default per project
    upload_max_bytes             int         536,870,912    1,024 .. 2^40        file uploads (413 beyond)
    default_model                str | null  null           1 .. 200 characters  generation: the model "default"

null means "no limit" (or no default model). A key's or project's own value wins over the
default. `SettingsCache` reads them for the hot path and re-reads at most every `ttl_s` (5 s):
a change reaches every replica within that bound. None of them is secret: any signed-in
principal may read them; only a platform admin changes them (`settings:write`), and each change
is audited with its value before and after.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from controlplane import audit
from controlplane.access import Principal, authorize
from controlplane.db import Database
from controlplane.errors import InvalidInput
from controlplane.models import Setting, utcnow


@dataclass(frozen=True)
class Known:
    """One setting: its type, default, bounds and what it is for."""

    type: type  # int or str
    default: Any
    low: int  # int: the least value; str: the least length
    high: int  # int: the most; str: the longest
    nullable: bool
    help: str

    def check(self, name: str, value: Any) -> Any:
        if value is None:
            if not self.nullable:
                raise InvalidInput(f"{name} may not be null; give a {self.type.__name__}", name)
            return None
        if self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidInput(f"{name} = {value!r} must be an integer", name)
            if not self.low <= value <= self.high:
                raise InvalidInput(
                    f"{name} = {value} is out of bounds: {self.low}..{self.high}", name
                )
            return value
        if not isinstance(value, str) or not self.low <= len(value) <= self.high:
            raise InvalidInput(
                f"{name} = {value!r} must be a string of {self.low}..{self.high} characters", name
            )
        return value


KNOWN: dict[str, Known] = {
    "requests_per_minute": Known(
        int, None, 1, 1_000_000, True, "default requests per minute of a key that sets none"
    ),
    "tokens_per_minute": Known(
        int, None, 1, 1_000_000_000, True, "default tokens per minute of a key that sets none"
    ),
    "tokens_per_day": Known(
        int, None, 1, 10**12, True, "default tokens per UTC day of a project that sets none"
    ),
    "tokens_per_month": Known(
        int, None, 1, 10**13, True, "default tokens per calendar month of a project that sets none"
    ),
    "upload_max_bytes": Known(
        int, 512 << 20, 1024, 1 << 40, False, "the largest file upload accepted, in bytes"
    ),
    "default_model": Known(str, None, 1, 200, True, "the model offered when none is chosen"),
}


def known(name: str) -> Known:
    spec = KNOWN.get(name)
    if spec is None:
        raise InvalidInput(f"no setting {name!r}; settings: {', '.join(KNOWN)}", name)
    return spec


def get_all(session: Session) -> dict[str, Any]:
    """Every known setting's value: the stored one, else its default."""
    stored = {s.key: s.value["value"] for s in session.scalars(select(Setting))}
    return {name: stored.get(name, spec.default) for name, spec in KNOWN.items()}


def set_value(session: Session, principal: Principal, name: str, value: Any) -> Any:
    """Change one setting (a platform admin's action), audited before → after; the value."""
    authorize(principal, "settings:write", None, _no_members)
    value = known(name).check(name, value)
    row = session.get(Setting, name)
    before = row.value["value"] if row is not None else KNOWN[name].default
    if row is None:
        row = Setting(key=name)
        session.add(row)
    row.value, row.updated_at, row.updated_by = {"value": value}, utcnow(), principal.actor
    audit.record(
        session, principal, "setting.set", name, before={"value": before}, after={"value": value}
    )
    return value


def set_values(session: Session, principal: Principal, values: dict[str, Any]) -> dict[str, Any]:
    """Change several settings at once (all or none: one bad value changes nothing); every
    setting's value after."""
    for name, value in values.items():
        set_value(session, principal, name, value)
    return get_all(session)


def _no_members(project_id: str, user_id: str) -> str | None:
    return None  # settings are platform-wide: no project role grants them


class SettingsCache:
    """The settings as the hot path reads them: from memory, re-read from the database when
    older than `ttl_s`, so a change made on any replica applies here within `ttl_s`."""

    def __init__(
        self,
        db: Database,
        *,
        ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.db, self.ttl_s, self.clock = db, ttl_s, clock
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {}
        self._read_at: float | None = None

    def stale(self) -> bool:
        read_at = self._read_at
        return read_at is None or self.clock() - read_at >= self.ttl_s

    def refresh(self) -> dict[str, Any]:
        """Read the database now (blocking: off the event loop)."""
        with self.db.session() as session:
            values = get_all(session)
        with self._lock:
            self._values, self._read_at = values, self.clock()
        return values

    def invalidate(self) -> None:
        """The next read goes to the database (after this process changed a setting)."""
        self._read_at = None

    def values(self) -> dict[str, Any]:
        """Every setting, re-read first if stale."""
        if self.stale():
            return self.refresh()
        return self._values

    def get(self, name: str) -> Any:
        known(name)
        return self.values()[name]
