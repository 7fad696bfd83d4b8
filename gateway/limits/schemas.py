"""A rate-limit decision, and how it reads in HTTP headers and error messages.

The headers are OpenAI's (`x-ratelimit-{limit,remaining,reset}-{requests,tokens}`), so clients
written for OpenAI back off correctly; "reset" is the time until the bucket is full again, in
Go's duration style as OpenAI writes it ("20ms", "1.5s", "6m0s").
"""

from __future__ import annotations

import math

import msgspec


class LimitDecision(msgspec.Struct, frozen=True, kw_only=True):
    allowed: bool  # True: one request and `requested_tokens` tokens were consumed
    limit_requests: int | None  # requests per minute; None = unlimited
    remaining_requests: int | None  # whole requests left now; None = unlimited or not looked up
    reset_requests_s: float | None  # seconds until the request bucket is full again
    limit_tokens: int | None  # tokens per minute; None = unlimited
    remaining_tokens: int | None  # whole tokens left now; None = unlimited or not looked up
    reset_tokens_s: float | None  # seconds until the token bucket is full again
    retry_after_s: float = 0.0  # refused: seconds until this same request would fit; else 0
    requested_tokens: int = 0  # what the request asked to reserve (prompt + max_tokens)
    # Which limit refused it: "requests", "tokens", or "too_large" (needs more tokens than the
    # whole per-minute limit); None when allowed.
    reason: str | None = None
    never: bool = False  # True: can never succeed as sent (reason "too_large"); answer 400


def format_duration(seconds: float) -> str:
    """OpenAI's reset style (Go durations): "0s", "120ms", "8.64s", "6m0s"; rounded up to ms."""
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))  # -1e-6: 0.3 s is 300 ms, not 301
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def headers(decision: LimitDecision) -> dict[str, str]:
    """Response headers for a decision; a dimension that is unlimited gets no headers."""
    out: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        limit = getattr(decision, f"limit_{kind}")
        if limit is None:
            continue
        out[f"x-ratelimit-limit-{kind}"] = str(limit)
        remaining = getattr(decision, f"remaining_{kind}")
        if remaining is not None:
            out[f"x-ratelimit-remaining-{kind}"] = str(remaining)
        reset = getattr(decision, f"reset_{kind}_s")
        if reset is not None:
            out[f"x-ratelimit-reset-{kind}"] = format_duration(reset)
    if not decision.allowed and not decision.never:
        out["Retry-After"] = str(max(1, math.ceil(decision.retry_after_s)))
    return out


def refusal_message(decision: LimitDecision) -> str:
    """An OpenAI-style message for a refused decision, naming the limit and the numbers."""
    if decision.never:
        return (
            f"this request may use up to {decision.requested_tokens} tokens (prompt + max_tokens), "
            f"more than this key's limit of {decision.limit_tokens} tokens per minute; "
            "lower max_tokens or shorten the prompt"
        )
    wait = format_duration(decision.retry_after_s)
    if decision.reason == "requests":
        return (
            f"rate limit reached: {decision.limit_requests} requests per minute; "
            f"try again in {wait}"
        )
    return (
        f"rate limit reached: {decision.limit_tokens} tokens per minute, "
        f"{decision.remaining_tokens} left, this request may use up to "
        f"{decision.requested_tokens}; try again in {wait}"
    )
