"""Rate limits held in this process: the embedded default (one gateway, no Redis).

`check_request` has no `await` between reading and writing a bucket, so on one event loop it
is atomic without a lock. Buckets are kept per (key id, dimension) and dropped when full, so
memory grows with the number of keys recently used, not with traffic.
"""

from __future__ import annotations

from gateway.clock import Clock, monotonic
from gateway.limits import bucket
from gateway.limits.schemas import LimitDecision

_State = tuple[float, float, int]  # (available, updated at, capacity)


class MemoryRateLimiter:
    def __init__(self, *, clock: Clock = monotonic):
        self._clock = clock
        self._buckets: dict[tuple[str, str], _State] = {}

    async def check_request(
        self, key_id: str, rpm: int | None, tpm: int | None, estimated_tokens: int
    ) -> LimitDecision:
        bucket.check_args(rpm, tpm, estimated_tokens)
        if tpm is not None and estimated_tokens > tpm:
            return bucket.too_large(rpm, tpm, estimated_tokens)
        now = self._clock()
        requests = self._level((key_id, "requests"), rpm, now)
        tokens = self._level((key_id, "tokens"), tpm, now)
        allowed = (requests is None or requests >= 1) and (
            tokens is None or tokens >= estimated_tokens
        )
        if allowed:
            if requests is not None:
                requests -= 1
                self._save((key_id, "requests"), requests, now, rpm)
            if tokens is not None:
                tokens -= estimated_tokens
                self._save((key_id, "tokens"), tokens, now, tpm)
        return bucket.decision(allowed, requests, tokens, rpm, tpm, estimated_tokens)

    async def settle(self, key_id: str, reserved: int, actual: int) -> None:
        state = self._buckets.get((key_id, "tokens"))
        if state is None:  # unlimited, or already full again: nothing to return
            return
        available, updated_at, capacity = state
        now = self._clock()
        tokens = bucket.level(available, updated_at, now, capacity) + reserved - actual
        self._save((key_id, "tokens"), max(0.0, tokens), now, capacity)

    async def close(self) -> None:
        self._buckets.clear()

    def _level(self, slot: tuple[str, str], capacity: int | None, now: float) -> float | None:
        if capacity is None:
            self._buckets.pop(slot, None)
            return None
        state = self._buckets.get(slot)
        if state is None:
            return float(capacity)
        return bucket.level(state[0], state[1], now, capacity)  # a new capacity applies at once

    def _save(self, slot: tuple[str, str], available: float, now: float, capacity: int) -> None:
        if available >= capacity:
            self._buckets.pop(slot, None)
        else:
            self._buckets[slot] = (available, now, capacity)
