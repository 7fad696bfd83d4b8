"""Per-key rate limits (requests and tokens per minute), in memory or shared through Redis."""

from __future__ import annotations

from gateway.limits.errors import LimiterUnavailable, LimitsError
from gateway.limits.service import (
    LimitDecision,
    MemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    headers,
    make_rate_limiter,
    refusal_message,
)

__all__ = [
    "LimitDecision",
    "LimiterUnavailable",
    "LimitsError",
    "MemoryRateLimiter",
    "RateLimiter",
    "RedisRateLimiter",
    "headers",
    "make_rate_limiter",
    "refusal_message",
]
