"""A request's credentials → the Principal it acts as (controlplane.access).

Programs send `Authorization: Bearer aim_<id>_<secret>`: the key is checked against the
control-plane database by `controlplane.keys.KeyAuthenticator` (its cache answers without I/O;
a lookup runs in a thread, off the event loop). Every route names its action in `opt`; a key
whose scopes or role can never allow that action is refused here (403) before any work. The
project-level check (`access.authorize`) is the service's, which knows the project.
"""

from __future__ import annotations

import asyncio

from controlplane.access import ACTIONS, PLATFORM_ACTIONS, ROLE_ACTIONS, SCOPES, Principal
from controlplane.errors import Forbidden
from controlplane.keys import KeyAuthenticator, KeyRecord, principal_of
from gateway.auth.errors import MissingKey, PermissionDenied

AUTHENTICATED = "authenticated"  # a route any signed-in principal may call


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


async def key_principal(
    keys: KeyAuthenticator, authorization: str | None
) -> tuple[Principal, KeyRecord]:
    """The Principal of a Bearer key and the key's record (its rate limits)."""
    token = parse_bearer(authorization)
    record = keys.cached(token) or await asyncio.to_thread(keys.authenticate, token)
    return principal_of(record), record


def require_action(principal: Principal, action: str) -> None:
    """Refuse a key that can never do `action`, whatever the project: no scope of it grants
    the action (`PermissionDenied`), or its role does not allow it (`Forbidden`)."""
    if action == AUTHENTICATED:
        return
    if action not in ACTIONS and action not in PLATFORM_ACTIONS:
        raise ValueError(f"unknown action {action!r} in a route's opt")  # a typo: fail loudly
    if principal.kind != "key":
        return
    granting = [scope for scope, (_, actions) in SCOPES.items() if action in actions]
    if not set(granting) & set(principal.scopes):
        held = ", ".join(principal.scopes) or "none"
        wanted = " or ".join(repr(s) for s in granting) or "none (a person's action)"
        raise PermissionDenied(
            f"API key {principal.id} lacks a scope for {action}: it needs {wanted} (it has: "
            f"{held})",
            granting[0] if granting else "",
        )
    if action not in ROLE_ACTIONS.get(principal.role or "", frozenset()):
        raise Forbidden(
            f"API key {principal.id} has the role {principal.role}, which may not {action}"
        )
