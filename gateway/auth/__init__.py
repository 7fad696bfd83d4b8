"""API keys: `aim_<id>_<secret>`, stored as sha256 in SQLite, with scopes and per-key limits."""

from __future__ import annotations

from gateway.auth.errors import (
    AuthError,
    InvalidKey,
    KeyInputError,
    MissingKey,
    PermissionDenied,
    UnknownKeyId,
)
from gateway.auth.schemas import KeyRecord
from gateway.auth.service import SCOPES, KeyStore, parse_bearer, require_scope

__all__ = [
    "SCOPES",
    "AuthError",
    "InvalidKey",
    "KeyInputError",
    "KeyRecord",
    "KeyStore",
    "MissingKey",
    "PermissionDenied",
    "UnknownKeyId",
    "parse_bearer",
    "require_scope",
]
