"""The limiting rule, as pure functions both limiters share.

Each key has up to two token buckets, one counted in requests and one in tokens:

    capacity = the per-minute limit          (a full bucket allows a burst of one minute's worth)
    refill   = limit / 60 per second, continuously, never above capacity
    a request is allowed iff requests >= 1 and tokens >= its estimate (prompt + max_tokens);
    then both are taken at once, else nothing is taken.
    settle() puts back estimate - actual (capped at capacity; the bucket never goes below 0).

A token bucket rather than a sliding window because tokens are reserved before generation and
returned after it: a bucket takes a refund as one addition, a window would have to find and
rewrite the original entry. It is also what OpenAI's headers describe ("reset" = time until the
bucket is full again). The cost: in any 60 s a key can pass up to twice its limit (a full
burst, then a minute of refill), never more; the steady rate is exactly the limit.

A bucket's state is (available, last update time, capacity); a full bucket is the same as no
state, which lets the stores forget idle keys (Redis expires them).
"""

from __future__ import annotations

from gateway.limits.schemas import LimitDecision

WINDOW_S = 60.0  # limits are per minute


def level(available: float, updated_at: float, now: float, capacity: int) -> float:
    """What a bucket holds at `now` after refilling since `updated_at` (seconds)."""
    refill = max(0.0, now - updated_at) * capacity / WINDOW_S
    return min(float(capacity), available + refill)


def seconds_until(available: float, needed: float, capacity: int) -> float:
    """How long until the bucket holds `needed`."""
    return max(0.0, needed - available) * WINDOW_S / capacity


def check_args(rpm: int | None, tpm: int | None, estimated_tokens: int) -> None:
    """The gateway passes validated numbers; a wrong one here is a bug, said plainly."""
    for field, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None and (isinstance(value, bool) or value < 1):
            raise ValueError(f"{field} must be >= 1 or None for unlimited (got {value!r})")
    if estimated_tokens < 0:
        raise ValueError(f"estimated_tokens must be >= 0 (got {estimated_tokens})")


def too_large(rpm: int | None, tpm: int, estimated_tokens: int) -> LimitDecision:
    """The request needs more than a whole bucket: no wait would let it through."""
    return LimitDecision(
        allowed=False,
        limit_requests=rpm,
        remaining_requests=None,
        reset_requests_s=None,
        limit_tokens=tpm,
        remaining_tokens=None,
        reset_tokens_s=None,
        requested_tokens=estimated_tokens,
        reason="too_large",
        never=True,
    )


def decision(
    allowed: bool,
    requests: float | None,
    tokens: float | None,
    rpm: int | None,
    tpm: int | None,
    estimated_tokens: int,
) -> LimitDecision:
    """The decision from what the buckets hold after it (`None`: that dimension is unlimited)."""
    wait_requests = wait_tokens = 0.0
    if not allowed:
        if requests is not None:
            wait_requests = seconds_until(requests, 1, rpm)
        if tokens is not None:
            wait_tokens = seconds_until(tokens, estimated_tokens, tpm)
    return LimitDecision(
        allowed=allowed,
        limit_requests=rpm,
        remaining_requests=None if requests is None else max(0, int(requests)),
        reset_requests_s=None if requests is None else seconds_until(requests, rpm, rpm),
        limit_tokens=tpm,
        remaining_tokens=None if tokens is None else max(0, int(tokens)),
        reset_tokens_s=None if tokens is None else seconds_until(tokens, tpm, tpm),
        retry_after_s=max(wait_requests, wait_tokens),
        requested_tokens=estimated_tokens,
        reason=None if allowed else ("requests" if wait_requests >= wait_tokens else "tokens"),
    )
