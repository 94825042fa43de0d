"""Redis state store: one Lua script per update that must be atomic across replicas.
Every key of one provider carries the same hash tag (`{fal}`), so each script touches one
slot and also runs on Redis Cluster."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.state.base import (
    LATENCY_BOUNDS,
    IdemClaim,
    Outcome,
    Policy,
    ProviderRecord,
    latency_bucket,
    percentile,
)

RECORD = """
local rec, win = KEYS[1], KEYS[2]
local now = tonumber(ARGV[5])
local state = redis.call('HGET', rec, 'state') or 'closed'
if ARGV[1] == '1' then
  redis.call('HINCRBY', win, 'ok', 1)
  local lat = tonumber(ARGV[2])
  if lat >= 0 then
    redis.call('HINCRBY', win, 'h' .. ARGV[3], 1)
    local alpha = tonumber(ARGV[9])
    local ewma = tonumber(redis.call('HGET', rec, 'ewma') or '')
    if ewma then ewma = alpha * lat + (1 - alpha) * ewma else ewma = lat end
    redis.call('HSET', rec, 'ewma', tostring(ewma))
  end
  if state == 'open' then redis.call('HSET', rec, 'recovered_at', ARGV[5]) end
  redis.call('HSET', rec, 'state', 'closed', 'consec', 0, 'opened', 0, 'open_until', 0)
else
  redis.call('HINCRBY', win, 'fail', 1)
  local consec = redis.call('HINCRBY', rec, 'consec', 1)
  redis.call('HSET', rec, 'last_error', ARGV[4])
  if state == 'open' or consec >= tonumber(ARGV[6]) then
    local opened = redis.call('HINCRBY', rec, 'opened', 1)
    local backoff = math.min(tonumber(ARGV[8]), tonumber(ARGV[7]) * 2 ^ (opened - 1))
    redis.call('HSET', rec, 'state', 'open', 'open_until', tostring(now + backoff))
  end
end
redis.call('EXPIRE', win, ARGV[10])
return 1
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

COOLDOWN = """
local current = tonumber(redis.call('HGET', KEYS[1], 'cooldown_until') or '0')
if tonumber(ARGV[1]) > current then redis.call('HSET', KEYS[1], 'cooldown_until', ARGV[1]) end
return 1
"""

HEDGE = """
local req = tonumber(redis.call('HGET', KEYS[1], 'req') or '0')
local hedged = tonumber(redis.call('HGET', KEYS[1], 'hedge') or '0')
if hedged >= math.floor(tonumber(ARGV[1]) * req) + tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], 'hedge', 1)
redis.call('EXPIRE', KEYS[1], 180)
return 1
"""


IDEM_BEGIN = """
local k = KEYS[1]
if redis.call('EXISTS', k) == 0 then
  redis.call('HSET', k, 'fp', ARGV[1], 'state', 'pending')
  redis.call('PEXPIRE', k, ARGV[2])
  return {'new', ''}
end
if redis.call('HGET', k, 'fp') ~= ARGV[1] then return {'conflict', ''} end
if redis.call('HGET', k, 'state') == 'done' then
  return {'done', redis.call('HGET', k, 'response')}
end
return {'pending', ''}
"""

IDEM_FINISH = """
if redis.call('HGET', KEYS[1], 'fp') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'done', 'response', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

IDEM_RELEASE = """
local fp, state = unpack(redis.call('HMGET', KEYS[1], 'fp', 'state'))
if fp == ARGV[1] and state == 'pending' then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _f(fields: dict[str, str], name: str, default: float = 0.0) -> float:
    value = fields.get(name)
    return float(value) if value not in (None, "") else default


class RedisStore:
    kind = "redis"

    def __init__(self, url: str, prefix: str = "upscale", timeout_s: float = 0.5):
        self._redis = aioredis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
            # One immediate retry, on a fresh connection: it replaces a pooled connection
            # that died with a restarted Redis. redis-py's default (10 retries, backoff of
            # up to seconds) outlasts the resilient wrapper's timeout, so a single stale
            # connection flipped the gateway to degraded after Redis had come back.
            retry=Retry(NoBackoff(), 1),
        )
        self._prefix = prefix
        self._record = self._redis.register_script(RECORD)
        self._release = self._redis.register_script(RELEASE)
        self._cooldown = self._redis.register_script(COOLDOWN)
        self._hedge = self._redis.register_script(HEDGE)
        self._idem_begin = self._redis.register_script(IDEM_BEGIN)
        self._idem_finish = self._redis.register_script(IDEM_FINISH)
        self._idem_release = self._redis.register_script(IDEM_RELEASE)

    def _key(self, provider: str, *parts: object) -> str:
        return ":".join((self._prefix, f"{{{provider}}}", *map(str, parts)))

    async def record(
        self, provider: str, outcome: Outcome, now: float, policy: Policy
    ) -> ProviderRecord:
        latency = outcome.latency_s if outcome.ok and outcome.latency_s is not None else -1.0
        await self._record(
            keys=[
                self._key(provider, "rec"),
                self._key(provider, "w", int(now // policy.bucket_s)),
            ],
            args=[
                "1" if outcome.ok else "0",
                repr(latency),
                latency_bucket(latency) if latency >= 0 else 0,
                outcome.error[:300],
                repr(now),
                policy.failure_threshold,
                policy.open_base_s,
                policy.open_max_s,
                policy.ewma_alpha,
                int(policy.window_s + 2 * policy.bucket_s),
            ],
        )
        return (await self.snapshot([provider], now, policy))[provider]

    async def snapshot(
        self, providers: Sequence[str], now: float, policy: Policy
    ) -> dict[str, ProviderRecord]:
        buckets = list(policy.buckets(now))
        pipe = self._redis.pipeline(transaction=False)
        for provider in providers:
            pipe.hgetall(self._key(provider, "rec"))
            for index in buckets:
                pipe.hgetall(self._key(provider, "w", index))
        replies: list[Any] = await pipe.execute()
        out: dict[str, ProviderRecord] = {}
        step = 1 + len(buckets)
        for n, provider in enumerate(providers):
            rec, windows = replies[n * step], replies[n * step + 1 : (n + 1) * step]
            histogram = [
                sum(int(w.get(f"h{i}", 0)) for w in windows) for i in range(len(LATENCY_BOUNDS))
            ]
            ewma = rec.get("ewma")
            out[provider] = ProviderRecord(
                provider=provider,
                state=rec.get("state", "closed"),
                open_until=_f(rec, "open_until"),
                opened_count=int(_f(rec, "opened")),
                consecutive_failures=int(_f(rec, "consec")),
                ewma_s=float(ewma) if ewma else None,
                p50_s=percentile(histogram, 0.5),
                p95_s=percentile(histogram, 0.95),
                successes=sum(int(w.get("ok", 0)) for w in windows),
                failures=sum(int(w.get("fail", 0)) for w in windows),
                last_error=rec.get("last_error", ""),
                cooldown_until=_f(rec, "cooldown_until"),
                drained=rec.get("drained") == "1",
                recovered_at=_f(rec, "recovered_at"),
            )
        return out

    async def try_probe(self, provider: str, token: str, ttl_s: float) -> bool:
        return bool(
            await self._redis.set(
                self._key(provider, "probe"), token, nx=True, px=max(1, int(ttl_s * 1000))
            )
        )

    async def release_probe(self, provider: str, token: str) -> None:
        await self._release(keys=[self._key(provider, "probe")], args=[token])

    async def set_cooldown(self, provider: str, until: float) -> None:
        await self._cooldown(keys=[self._key(provider, "rec")], args=[repr(until)])

    async def set_drained(self, provider: str, drained: bool) -> None:
        await self._redis.hset(self._key(provider, "rec"), "drained", "1" if drained else "0")

    def _minute_key(self, now: float) -> str:
        return self._key("hedge", "m", int(now // 60))

    async def count_request(self, now: float) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hincrby(self._minute_key(now), "req", 1)
        pipe.expire(self._minute_key(now), 180)
        await pipe.execute()

    async def take_hedge(self, now: float, share: float, minimum: int) -> bool:
        return bool(await self._hedge(keys=[self._minute_key(now)], args=[share, minimum]))

    def _idem_key(self, key: str) -> str:
        return f"{self._prefix}:idem:{{{key}}}"  # its own hash tag: one slot per key

    async def idem_begin(self, key: str, fingerprint: str, lease_s: float) -> IdemClaim:
        state, response = await self._idem_begin(
            keys=[self._idem_key(key)], args=[fingerprint, int(lease_s * 1000)]
        )
        return IdemClaim(state, response or "")

    async def idem_finish(self, key: str, fingerprint: str, response: str, ttl_s: float) -> None:
        await self._idem_finish(
            keys=[self._idem_key(key)], args=[fingerprint, response, int(ttl_s * 1000)]
        )

    async def idem_release(self, key: str, fingerprint: str) -> None:
        await self._idem_release(keys=[self._idem_key(key)], args=[fingerprint])

    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    async def aclose(self) -> None:
        await self._redis.aclose()
