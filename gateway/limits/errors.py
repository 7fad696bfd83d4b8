"""Rate-limit errors. The limiter itself answers with a `LimitDecision`, not an exception; these
are what a request meets:

    LimiterUnavailable  the shared store cannot decide at all: 503, rather than guessing whether
                        to let traffic through
    RateLimited         a refused decision: 429 with Retry-After and the x-ratelimit headers
    TooLargeForLimit    a request larger than the key's whole per-minute token limit: 400, since
                        waiting never lets it through

Nothing here imports the gateway: `gateway/errors.py` maps these to HTTP in its status table.
"""

from __future__ import annotations


class LimitsError(Exception):
    """Base of the rate limiter's errors."""


class LimiterUnavailable(LimitsError):
    """The shared store (Redis) is unreachable or failed; the message names its URL, without
    the password."""


class RateLimited(Exception):
    """A key's request or token bucket refused this request; it may succeed after
    `retry_after_s`. `headers` are the decision's x-ratelimit headers."""

    def __init__(self, message: str, retry_after_s: float, headers: dict[str, str]):
        super().__init__(message)
        self.retry_after_s, self.headers = retry_after_s, headers


class TooLargeForLimit(Exception):
    """The request may use more tokens than the key's whole per-minute limit: no wait helps."""
