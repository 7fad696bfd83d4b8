"""Rate limits shared by several gateway replicas through Redis.

Each decision is one Lua script, so reading, refilling and taking from both buckets is atomic
across replicas. Time is the Redis server's (`TIME`) by default: one clock for every replica,
whatever their own clocks say. Tests pass `clock=` and the script then uses the client's time,
in ms, given as an argument. A bucket is a hash {avail, ts (ms), cap} under
`<prefix>{<key id>}:requests|tokens` (the braces keep both in one cluster slot); it expires
when it would be full again, so idle keys cost nothing.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from gateway.clock import Clock
from gateway.limits import bucket
from gateway.limits.errors import LimiterUnavailable
from gateway.limits.schemas import LimitDecision

_COMMON = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function level(key, cap)
  if not cap then return nil end
  local v = redis.call('HMGET', key, 'avail', 'ts')
  local avail, ts = tonumber(v[1]), tonumber(v[2])
  if not avail then return cap end
  return math.min(cap, avail + math.max(0, now - ts) * cap / 60000)
end
local function save(key, cap, avail)
  if avail >= cap then
    redis.call('DEL', key)
    return
  end
  redis.call('HSET', key, 'avail', tostring(avail), 'ts', tostring(now), 'cap', tostring(cap))
  redis.call('PEXPIRE', key, math.ceil((cap - avail) * 60000 / cap) + 1000)
end
"""

# KEYS: requests bucket, tokens bucket. ARGV: now ms ("" = server time), rpm, tpm ("" = none),
# estimated tokens. Returns {allowed, requests left, tokens left} ("" = unlimited).
_CHECK = (
    _COMMON
    + """
local rpm, tpm, cost = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local req, tok = level(KEYS[1], rpm), level(KEYS[2], tpm)
local allowed = (not req or req >= 1) and (not tok or tok >= cost)
if allowed then
  if req then req = req - 1; save(KEYS[1], rpm, req) end
  if tok then tok = tok - cost; save(KEYS[2], tpm, tok) end
end
return {allowed and 1 or 0, tostring(req or ''), tostring(tok or '')}
"""
)

# KEYS: tokens bucket. ARGV: now ms ("" = server time), tokens to put back (may be negative).
_SETTLE = (
    _COMMON
    + """
local cap = tonumber(redis.call('HGET', KEYS[1], 'cap'))
if not cap then return 0 end
save(KEYS[1], cap, math.max(0, level(KEYS[1], cap) + tonumber(ARGV[2])))
return 1
"""
)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


class RedisRateLimiter:
    def __init__(
        self,
        client,  # a redis.asyncio.Redis; the limiter closes it in close()
        *,
        url: str = "redis",  # for error messages only (redacted)
        prefix: str = "aimass:ratelimit:",  # namespace of the bucket keys
        clock: Clock | None = None,  # None: the Redis server's TIME, one clock for all replicas
    ):
        self._client = client
        self._url = redact(url)
        self._prefix = prefix
        self._clock = clock
        self._check = client.register_script(_CHECK)
        self._settle = client.register_script(_SETTLE)
        # deferred: redis loads only for a gateway configured with it (whoever built `client`
        # has imported it already)
        from redis.exceptions import RedisError

        self._failures = (RedisError, OSError)

    async def check_request(
        self, key_id: str, rpm: int | None, tpm: int | None, estimated_tokens: int
    ) -> LimitDecision:
        bucket.check_args(rpm, tpm, estimated_tokens)
        if tpm is not None and estimated_tokens > tpm:
            return bucket.too_large(rpm, tpm, estimated_tokens)
        if rpm is None and tpm is None:
            return bucket.decision(True, None, None, None, None, estimated_tokens)
        args = [self._now_ms(), _arg(rpm), _arg(tpm), estimated_tokens]
        allowed, requests, tokens = await self._call(self._check, self._keys(key_id), args)
        return bucket.decision(
            allowed == 1, _float(requests), _float(tokens), rpm, tpm, estimated_tokens
        )

    async def settle(self, key_id: str, reserved: int, actual: int) -> None:
        if reserved != actual:
            keys = self._keys(key_id)[1:]
            await self._call(self._settle, keys, [self._now_ms(), reserved - actual])

    async def close(self) -> None:
        await self._client.aclose()

    def _keys(self, key_id: str) -> list[str]:
        return [f"{self._prefix}{{{key_id}}}:requests", f"{self._prefix}{{{key_id}}}:tokens"]

    def _now_ms(self) -> str:
        return "" if self._clock is None else str(int(self._clock() * 1000))

    async def _call(self, script, keys: list[str], args: list):
        try:
            return await script(keys=keys, args=args)
        except self._failures as e:
            raise LimiterUnavailable(f"rate-limit Redis at {self._url} failed: {e}") from e


def _arg(limit: int | None) -> str:
    return "" if limit is None else str(limit)


def _float(value: bytes | str) -> float | None:
    text = value.decode() if isinstance(value, bytes) else value
    return float(text) if text else None
