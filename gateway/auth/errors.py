"""API-key errors: one closed set. This package raises them; gateway/errors.py's status table
maps the three a request can hit to HTTP (nothing here imports it).

    error               meaning                                                  HTTP   CLI exit
    MissingKey          no Authorization header, or not `Bearer <key>`           401    -
    InvalidKey          unknown, malformed, wrong secret or revoked key          401    -
    PermissionDenied    a valid key without the scope the route needs            403    -
    KeyInputError       bad input to the key store (project, scope, limit)       -      2
    UnknownKeyId        no key with that id (revoke, get)                        -      2

`AuthError` is the base of the three a request can hit; `KeyInputError` is the control plane's
(creating, listing, revoking keys: the CLI today, so no HTTP status yet) and is deliberately not
an `AuthError`, so that a handler mapping "any AuthError" to 401 never turns a typo in a project
name into "unauthorized".
Messages never contain a key's secret, only its public id.
"""

from __future__ import annotations


class AuthError(Exception):
    """Base of the errors a request's credentials can raise."""


class MissingKey(AuthError):
    """The request carries no API key: no Authorization header, or not the Bearer scheme."""


class InvalidKey(AuthError):
    """The key is malformed, unknown, revoked, or its secret does not match."""


class PermissionDenied(AuthError):
    """The key is valid but lacks the scope the operation needs; `scope` names it."""

    def __init__(self, message: str, scope: str):
        super().__init__(message)
        self.scope = scope


class KeyInputError(ValueError):
    """Bad input to the key store; the message names the field, the value and the limit."""


class UnknownKeyId(KeyInputError):
    """No key has this id."""
