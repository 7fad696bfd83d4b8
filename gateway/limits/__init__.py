"""Per-key rate limits (requests and tokens per minute), in memory or shared through Redis.

    service.py        the `RateLimiter` interface and `make_rate_limiter`
    bucket.py         the rule (token buckets), shared by both limiters
    memory.py         one process (the embedded default)
    redis_limiter.py  several gateway replicas sharing limits
    schemas.py        a decision, its HTTP headers and refusal message
    errors.py         a limiter that cannot decide at all

Import from the modules; this package imports none of them, so none imports it back.
"""
