"""Rate limits: the token-bucket rule, headers, and the memory and Redis limiters alike.

Both limiters run every behaviour test with a fake clock (the Redis one then takes the time
from the client instead of the server's TIME), so nothing sleeps. Redis tests use a key prefix
of their own and are skipped, saying why, when no Redis answers at $AIMASS_TEST_REDIS_URL
(default redis://127.0.0.1:6379/0).
"""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from gateway.limits.errors import LimiterUnavailable
from gateway.limits.memory import MemoryRateLimiter
from gateway.limits.redis_limiter import RedisRateLimiter
from gateway.limits.schemas import format_duration, headers, refusal_message
from gateway.limits.service import make_rate_limiter
from tests.gateway.fakes import FakeClock

REDIS_URL = os.environ.get("AIMASS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _redis_or_skip():
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except (redis.RedisError, OSError) as e:
        pytest.skip(f"no Redis at {REDIS_URL} ({e}); set AIMASS_TEST_REDIS_URL to run these")
    return client


@pytest.fixture
def redis_prefix():
    """A fresh key namespace on the test Redis, deleted afterwards."""
    client = _redis_or_skip()
    prefix = f"aimass-test:{uuid.uuid4().hex}:"
    yield prefix
    for key in client.scan_iter(match=prefix + "*"):
        client.delete(key)
    client.close()


@pytest.fixture(params=["memory", "redis"])
def new_limiter(request):
    """`new_limiter(clock)` -> a limiter of each kind (call it inside the test's event loop)."""
    if request.param == "memory":
        return lambda clock=None: MemoryRateLimiter(clock=clock or FakeClock())
    prefix = request.getfixturevalue("redis_prefix")

    def new(clock=None, *, server_time: bool = False):
        import redis.asyncio

        client = redis.asyncio.from_url(REDIS_URL)
        return RedisRateLimiter(
            client, url=REDIS_URL, prefix=prefix, clock=None if server_time else clock
        )

    return new


def run(coro):
    return asyncio.run(coro)


def test_rpm_exhausted_then_retry_after(new_limiter):
    async def body():
        clock = FakeClock()
        limiter = new_limiter(clock)
        decisions = [await limiter.check_request("k1", 3, None, 10) for _ in range(4)]
        assert [d.allowed for d in decisions] == [True, True, True, False]
        assert [d.remaining_requests for d in decisions] == [2, 1, 0, 0]
        refused = decisions[-1]
        assert refused.reason == "requests" and not refused.never
        assert 0 < refused.retry_after_s <= 60 and refused.retry_after_s == pytest.approx(20)
        assert 1 <= int(headers(refused)["Retry-After"]) <= 60
        assert await limiter.check_request("other", 3, None, 10) is not None  # keys are apart
        assert (await limiter.check_request("other", 3, None, 10)).remaining_requests == 1
        clock.now += refused.retry_after_s
        assert (await limiter.check_request("k1", 3, None, 10)).allowed
        await limiter.close()

    run(body())


def test_tpm_exhausted_and_reset(new_limiter):
    async def body():
        limiter = new_limiter(FakeClock())
        first = await limiter.check_request("k1", None, 100, 40)
        assert first.allowed and first.remaining_tokens == 60
        assert first.reset_tokens_s == pytest.approx(24)  # 40 tokens at 100/60 per second
        assert (await limiter.check_request("k1", None, 100, 40)).remaining_tokens == 20
        refused = await limiter.check_request("k1", None, 100, 40)
        assert not refused.allowed and refused.reason == "tokens"
        assert refused.retry_after_s == pytest.approx(12)  # 20 more tokens needed
        assert refused.remaining_tokens == 20  # a refusal takes nothing
        assert "100 tokens per minute" in refusal_message(refused)
        await limiter.close()

    run(body())


def test_request_larger_than_the_limit_can_never_pass(new_limiter):
    async def body():
        limiter = new_limiter(FakeClock())
        d = await limiter.check_request("k1", 10, 100, 101)
        assert (d.allowed, d.never, d.reason) == (False, True, "too_large")
        assert "Retry-After" not in headers(d)
        assert "101 tokens" in refusal_message(d) and "limit of 100" in refusal_message(d)
        full = await limiter.check_request("k1", 10, 100, 100)  # nothing was taken
        assert full.allowed and full.remaining_tokens == 0 and full.remaining_requests == 9
        await limiter.close()

    run(body())


def test_settle_returns_unused_tokens(new_limiter):
    async def body():
        clock = FakeClock()
        limiter = new_limiter(clock)
        assert (await limiter.check_request("k1", None, 100, 80)).allowed
        assert not (await limiter.check_request("k1", None, 100, 70)).allowed
        await limiter.settle("k1", reserved=80, actual=30)  # 50 back: 70 left
        d = await limiter.check_request("k1", None, 100, 70)
        assert d.allowed and d.remaining_tokens == 0
        await limiter.settle("k1", reserved=70, actual=0)  # never above the capacity
        await limiter.settle("k1", reserved=70, actual=0)
        assert (await limiter.check_request("k1", None, 100, 1)).remaining_tokens == 99
        await limiter.settle("k1", reserved=1, actual=500)  # overuse: empty, not in debt
        clock.now += 0.6  # refills 1 token
        assert (await limiter.check_request("k1", None, 100, 1)).allowed
        await limiter.settle("nobody", reserved=5, actual=1)  # no bucket: nothing to do
        await limiter.close()

    run(body())


def test_concurrent_requests_get_exactly_the_limit(new_limiter):
    async def body():
        limiter = new_limiter(FakeClock())
        decisions = await asyncio.gather(
            *(limiter.check_request("k1", 10, 1000, 1) for _ in range(100))
        )
        assert sum(d.allowed for d in decisions) == 10
        await limiter.close()

    run(body())


def test_unlimited_dimensions(new_limiter):
    async def body():
        limiter = new_limiter(FakeClock())
        d = await limiter.check_request("k1", None, None, 10**9)
        assert d.allowed and headers(d) == {}
        d = await limiter.check_request("k1", 5, None, 10**9)
        assert set(headers(d)) == {
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        }
        with pytest.raises(ValueError, match="rpm must be >= 1"):
            await limiter.check_request("k1", 0, None, 1)
        await limiter.close()

    run(body())


def test_redis_server_time_and_expiry(redis_prefix):
    import redis

    async def body():
        limiter = await make_rate_limiter(REDIS_URL, prefix=redis_prefix)
        assert isinstance(limiter, RedisRateLimiter)
        decisions = [await limiter.check_request("k1", 3, 600, 10) for _ in range(4)]
        assert [d.allowed for d in decisions] == [True, True, True, False]
        assert 0 < decisions[-1].retry_after_s <= 60
        await limiter.close()

    run(body())
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=redis_prefix + "*"))
    assert len(keys) == 2  # requests and tokens buckets of k1, in one cluster slot
    assert all(0 < client.pttl(k) <= 61_000 for k in keys)  # gone once they would be full
    client.close()


def test_make_rate_limiter():
    async def body():
        assert isinstance(await make_rate_limiter(None), MemoryRateLimiter)
        with pytest.raises(LimiterUnavailable, match="127.0.0.1:1") as e:
            await make_rate_limiter("redis://:hunter2@127.0.0.1:1/0")
        assert "hunter2" not in str(e.value)
        with pytest.raises(LimiterUnavailable, match="invalid Redis URL"):
            await make_rate_limiter("http://example")

    run(body())


def test_headers_and_durations():
    assert [format_duration(s) for s in (0, 0.02, 0.3, 1, 8.64, 90.5, 360)] == [
        "0s",
        "20ms",
        "300ms",
        "1s",
        "8.64s",
        "1m30.5s",
        "6m0s",
    ]

    async def body():
        limiter = MemoryRateLimiter(clock=FakeClock())
        d = await limiter.check_request("k1", 60, 6000, 100)
        assert headers(d) == {
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-remaining-requests": "59",
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-limit-tokens": "6000",
            "x-ratelimit-remaining-tokens": "5900",
            "x-ratelimit-reset-tokens": "1s",
        }

    run(body())
