"""Rate-limit errors. A refused request is not an error (it is a `LimitDecision`); these are
for a limiter that cannot decide at all, which the app answers with 503 rather than guessing
whether to let traffic through."""

from __future__ import annotations


class LimitsError(Exception):
    """Base of the rate limiter's errors."""


class LimiterUnavailable(LimitsError):
    """The shared store (Redis) is unreachable or failed; the message names its URL, without
    the password."""
