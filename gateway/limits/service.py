"""Per-key rate limits on requests and tokens per minute: the interface and its factory.

The app calls `check_request` before a request reaches an engine (one request and the
request's token estimate, prompt + max_tokens, are taken atomically, or nothing is) and
`settle` once it finished, with the tokens actually used, so a key is charged for what it
generated, not for what it might have. The rule (token buckets refilled over 60 s) is in
`bucket.py`; `None` for a limit means that dimension is unlimited.

    MemoryRateLimiter   one process (the embedded default)
    RedisRateLimiter    several gateway replicas sharing limits
"""

from __future__ import annotations

from typing import Protocol

from gateway.clock import Clock, monotonic
from gateway.limits.errors import LimiterUnavailable
from gateway.limits.memory import MemoryRateLimiter
from gateway.limits.redis_limiter import RedisRateLimiter, redact
from gateway.limits.schemas import LimitDecision


class RateLimiter(Protocol):
    async def check_request(
        self, key_id: str, rpm: int | None, tpm: int | None, estimated_tokens: int
    ) -> LimitDecision:
        """Take one request and `estimated_tokens` tokens if both fit; say so either way."""
        ...

    async def settle(self, key_id: str, reserved: int, actual: int) -> None:
        """Return `reserved - actual` tokens taken by `check_request`."""
        ...

    async def close(self) -> None: ...


async def make_rate_limiter(
    redis_url: str | None,
    *,
    clock: Clock = monotonic,  # the in-memory buckets' time
    prefix: str = "aimass:ratelimit:",  # Redis key namespace (several gateways, one Redis)
) -> RateLimiter:
    """In-memory limits without a URL; else Redis at `redis_url`, checked with a PING now so a
    wrong URL fails at startup (`LimiterUnavailable`, naming it) rather than on the first
    request. Redis buckets keep the Redis server's time, not `clock`: replicas share buckets,
    and each replica's monotonic clock counts from its own start."""
    if not redis_url:
        return MemoryRateLimiter(clock=clock)
    # deferred: redis's client modules load only for a gateway configured with Redis
    import redis.asyncio
    from redis.exceptions import RedisError

    try:
        client = redis.asyncio.from_url(redis_url, socket_connect_timeout=5, socket_timeout=5)
    except ValueError as e:
        raise LimiterUnavailable(f"invalid Redis URL {redact(redis_url)!r}: {e}") from e
    try:
        await client.ping()
    except (RedisError, OSError) as e:
        await client.aclose()
        raise LimiterUnavailable(
            f"cannot reach the rate-limit Redis at {redact(redis_url)}: {e}"
        ) from e
    return RedisRateLimiter(client, url=redis_url, prefix=prefix)
