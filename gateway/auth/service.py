"""A request's credentials → the Principal it acts as (controlplane.access), and which models
that principal may see.

Programs send `Authorization: Bearer aim_<id>_<secret>`: the key is checked against the
control-plane database by `controlplane.keys.KeyAuthenticator` (its cache answers without I/O;
a lookup runs in a thread, off the event loop). People send the session cookie that
`POST /v1/auth/login` set (`SESSION_COOKIE`); a state-changing request signed in that way must
also carry the session's CSRF token. Every route names its action in `opt`; a key whose scopes
or role can never allow that action is refused here (403) before any work. The project-level
check (`access.authorize`) is the service's, which knows the project.

A model name owned by a project (`model_owners`) is absent to everyone outside it:
`ModelOwners` keeps the table in memory for `ttl_s` (5 s) and answers `hidden(principal, name)`;
a name it has not seen exist before its last read (a model just pushed) is read again first.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from controlplane.access import (
    ACTIONS,
    PLATFORM_ACTIONS,
    ROLE_ACTIONS,
    SCOPES,
    Principal,
    authorize,
)
from controlplane.db import Database
from controlplane.errors import Forbidden
from controlplane.identity import (
    SignedIn,
    credentials_exist,
    may_see_model,
    model_owners,
    role_of,
    session_of,
)
from controlplane.keys import KeyAuthenticator, KeyRecord, principal_of
from gateway.auth.errors import MissingKey, PermissionDenied

AUTHENTICATED = "authenticated"  # a route any signed-in principal may call
SESSION_COOKIE = "aimass_session"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"  # the form field, for HTML forms that cannot set a header
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def parse_bearer(header_value: str | None) -> str:
    """The key from an `Authorization: Bearer <key>` header value; `MissingKey` otherwise.

    The messages never repeat the header: it may hold a secret sent under the wrong scheme."""
    if not header_value or not header_value.strip():
        raise MissingKey(
            "not signed in: send the header 'Authorization: Bearer aim_...' (an API key), or "
            "sign in with POST /v1/auth/login"
        )
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


async def session_principal(db: Database, token: str) -> tuple[Principal, SignedIn]:
    """The person a session cookie signs in (`Unauthenticated` otherwise)."""

    def read() -> tuple[Principal, SignedIn]:
        with db.session() as s:
            return session_of(s, token)

    return await asyncio.to_thread(read)


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


class ModelOwners:
    """Which project each owned model name belongs to, read at most every `ttl_s` seconds: an
    existing model made a project's on another replica is hidden here within that bound.

    A new model is never shared, not even for an instant: a fine-tuning worker writes the
    name's owner row before it pushes the model to the registry, so a name the gateway sees
    exist (`exists`: listed by the registry, or acquired) is shared only if a read of the table
    that began after it was seen found no row. Any other name makes the next question read the
    table again."""

    def __init__(
        self, db: Database, *, ttl_s: float = 5.0, clock: Callable[[], float] = time.monotonic
    ):
        self.db, self.ttl_s, self._clock = db, ttl_s, clock
        self._owners: dict[str, str] = {}
        self._read_at: float | None = None
        self._seen: set[str] = set()  # model names seen to exist, in the registry or loaded
        self._shared: frozenset[str] = frozenset()  # seen before the last read, and unowned
        self._news = 0  # names seen that the last read may have missed: a read under way is stale

    def exists(self, names: Iterable[str]) -> bool:
        """The gateway saw these model names exist. True if one is neither owned nor known to
        be shared: the next `hidden` reads the table first (ask again to be sure)."""
        new = [n for n in names if n not in self._owners and n not in self._shared]
        if new:
            self._seen.update(new)
            self._read_at = None
            self._news += 1
        return bool(new)

    async def hidden(self, principal: Principal, name: str, action: str = "models:read") -> bool:
        """Whether the model `name` belongs to a project `principal` is not in. A member whose
        role does not allow `action` on it is refused (`Forbidden`): a key's role was checked
        with the route's action already."""
        now = self._clock()
        if self._read_at is None or now - self._read_at >= self.ttl_s:
            news, seen = self._news, frozenset(self._seen)
            self._owners = await asyncio.to_thread(self._read)
            self._shared = seen - self._owners.keys()
            if news == self._news:  # no name appeared while it read
                self._read_at = now
        owner = self._owners.get(name)
        if owner is None or principal.is_admin or principal.kind == "key":
            return not may_see_model(None, principal, owner)  # no database needed
        return not await asyncio.to_thread(self._member, principal, owner, action)

    def forget(self) -> None:
        """Read the table again at the next question (after a change through this process)."""
        self._read_at = None
        self._news += 1

    def _read(self) -> dict[str, str]:
        with self.db.session() as s:
            return model_owners(s)

    def _member(self, principal: Principal, owner: str, action: str) -> bool:
        with self.db.session() as s:
            if not may_see_model(s, principal, owner):
                return False
            authorize(principal, action, owner, lambda p, u: role_of(s, p, u))
            return True


def addressed_to_loopback(host: str | None, origin: str | None) -> bool:
    """Whether a request named this machine by a loopback name or address (its Host header)
    and, when a browser sent it, came from a loopback page (its Origin). A page of another site
    whose name was made to resolve to 127.0.0.1 (DNS rebinding) still names itself in Host, and
    its scripts in Origin: loopback trust is never extended to it."""
    if not host or not is_loopback(urlsplit(f"//{host}").hostname or ""):
        return False
    return origin is None or is_loopback(urlsplit(origin).hostname or "")


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# A gateway that started in open access (no user, no key, loopback) looks again this often:
# a person or key made meanwhile through the CLI, which writes the database directly, ends it.
OPEN_ACCESS_RECHECK_S = 5.0


async def open_access_holds(state) -> bool:
    """Whether requests still go without authentication. `state`: the app's state, with
    `open_access` (bool), `open_access_checked` (its clock's time of the last look), `db` and
    `clock`. Once anyone can sign in it is over for good, on this replica."""
    if not state.open_access:
        return False
    now = state.clock()
    if now - state.open_access_checked >= OPEN_ACCESS_RECHECK_S:
        state.open_access_checked = now

        def exists() -> bool:
            with state.db.session() as s:
                return credentials_exist(s)

        if await asyncio.to_thread(exists):
            state.open_access = False
    return state.open_access


async def serves_openly(state, headers) -> bool:
    """Whether this request goes without authentication: open access still holds, and the
    request is addressed to this machine from it (`headers`: the request's)."""
    return addressed_to_loopback(headers.get("host"), headers.get("origin")) and (
        await open_access_holds(state)
    )
