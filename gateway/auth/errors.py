"""The gateway's own credential errors, beside the control plane's (controlplane/errors.py):
gateway/errors.py's status table maps them to HTTP (nothing here imports it).

    error               meaning                                                  HTTP
    MissingKey          no Authorization header or session, or not `Bearer <key>`  401
    PermissionDenied    a valid key whose scopes can never grant the route's action 403

A bad key itself is controlplane.keys.InvalidKey (401). Messages never contain a key's secret.
"""

from __future__ import annotations

from controlplane.errors import Forbidden, Unauthenticated


class MissingKey(Unauthenticated):
    """The request carries no credentials: no Authorization header, or not the Bearer scheme."""


class PermissionDenied(Forbidden):
    """The key is valid but none of its scopes grants the action; `scope` names one that would."""

    def __init__(self, message: str, scope: str):
        super().__init__(message)
        self.scope = scope
