"""The control plane's errors: one closed set. gateway/errors.py maps each to one HTTP status in
OpenAI's error shape; the CLIs print the message on one line and exit 2 (1 for `Unavailable`).

    error            meaning                                                       HTTP
    InvalidInput     a field's value is out of its bounds; names field, value, limit  400
    Unauthenticated  no or bad credentials: password, session, key                   401
    Forbidden        authenticated, but the role or key scope does not allow it        403
    NotFound         no such thing, or it belongs to a project the caller is not in    404
    Conflict         it exists already, or its state does not allow the change         409
    TooLarge         an upload over the configured limit                               413
    QuotaExceeded    the project's token quota is used up; says which and when it resets 429

A resource of another project is `NotFound`, never `Forbidden`: the answer must not tell an
outsider that it exists.
"""

from __future__ import annotations

from datetime import datetime


class ControlPlaneError(Exception):
    """Base of the control plane's errors; `param` names the request field at fault, if any."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class InvalidInput(ControlPlaneError, ValueError):
    pass


class Unauthenticated(ControlPlaneError):
    pass


class Forbidden(ControlPlaneError):
    pass


class NotFound(ControlPlaneError):
    pass


class Conflict(ControlPlaneError):
    pass


class TooLarge(ControlPlaneError):
    pass


class QuotaExceeded(ControlPlaneError):
    def __init__(self, message: str, quota: str, resets_at: datetime):
        super().__init__(message)
        self.quota = quota  # "tokens_per_day" | "tokens_per_month"
        self.resets_at = resets_at  # UTC
