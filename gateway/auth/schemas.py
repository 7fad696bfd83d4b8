"""What the gateway knows about an API key once it is authenticated.

`KeyRecord` carries no secret and no hash: the sha256 stays in the database row and is read
only by `KeyStore.authenticate`, so encoding a record (API responses, logs, `aimass keys list`)
can never leak material that identifies the key's secret.
"""

from __future__ import annotations

from datetime import datetime

import msgspec


class KeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str  # public part of the key (`aim_<key_id>_<secret>`); safe to log and show
    project: str  # the project the key acts for; quotas and metering are counted per project
    scopes: tuple[str, ...]  # what the key may do; a subset of `service.SCOPES`
    created_at: datetime  # UTC
    name: str | None = None  # a human label ("ci", "alice's laptop"); not unique
    revoked_at: datetime | None = None  # UTC; a revoked key never authenticates again
    requests_per_minute: int | None = None  # per-key limit; None = the project's/default limit
    tokens_per_minute: int | None = None  # per-key limit; None = the project's/default limit

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def public(self) -> dict:
        """JSON-ready view for API responses and `aimass keys list --json`."""
        return msgspec.to_builtins(self)
