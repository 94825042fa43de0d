"""Redis state store: one Lua script per update that must be atomic across replicas.
Every key of one provider carries the same hash tag (`{fal}`), so each script touches one
slot and also runs on Redis Cluster. One class per concern (base.py), on a client and key
prefix they share, and `RedisStore` made of the four."""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from gateway.state import lua
from gateway.state.base import (
    BILLED_JOB_KEEP_S,
    CLAIM_KEEP_S,
    LATENCY_BOUNDS,
    Admission,
    Hold,
    IdemClaim,
    JobCharge,
    Ledger,
    Outcome,
    Period,
    Policy,
    ProviderRecord,
    Quota,
    latency_bucket,
    percentile,
)
from gateway.state.composed import ComposedStore


def _f(fields: dict[str, str], name: str, default: float = 0.0) -> float:
    value = fields.get(name)
    return float(value) if value not in (None, "") else default


# Connections one process keeps to Redis. redis-py's default pool stops at 100 and then
# fails the call (MaxConnectionsError): a burst of 400 admissions failed 300 of them, and
# the resilient store took that for Redis being down. This pool is smaller (descriptors
# on both sides, and Redis's maxclients shared by every replica's workers) and, past it, a
# call waits for a free connection as long as it would wait for a connect.
MAX_CONNECTIONS = 64


def connect(
    url: str,
    timeout_s: float = 0.5,
    read_timeout_s: float = 2.5,
    max_connections: int = MAX_CONNECTIONS,
) -> aioredis.Redis:
    """The client the parts of one store share."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        # A call waits for a free connection as long as its caller lets it (each bounds its
        # own call): the wait ends as the calls ahead finish, each within read_timeout_s. A
        # wait timeout of its own failed a burst's tail on a loaded machine (400 admissions,
        # three busy cores: 100-190 "No connection available"), and its cancellations inside
        # the pool's asyncio.Condition can lose a wake-up on Python 3.11 (gh-112202).
        timeout=None,
        decode_responses=True,
        # Reads may wait longer than connects: callers bound each call themselves
        # (ResilientStore), budgets and idempotency with more patience than routing.
        socket_timeout=read_timeout_s,
        socket_connect_timeout=timeout_s,
        retry_on_timeout=False,
        # One immediate retry, on a fresh connection: it replaces a pooled connection
        # that died with a restarted Redis. redis-py's default (10 retries, backoff of
        # up to seconds) outlasts the resilient wrapper's timeout, so a single stale
        # connection flipped the gateway to degraded after Redis had come back.
        retry=Retry(NoBackoff(), 1),
    )
    return aioredis.Redis.from_pool(pool)


class RedisHealth:
    """Provider records, windows, breaker, probe lock and the hedge budget: every key
    of a provider under its hash tag (`{fal}`), the hedge budget's under `{hedge}`."""

    def __init__(self, client: aioredis.Redis, prefix: str):
        self._redis = client
        self._prefix = prefix
        self._record = client.register_script(lua.RECORD)
        self._release = client.register_script(lua.RELEASE)
        self._cooldown = client.register_script(lua.COOLDOWN)
        self._hedge = client.register_script(lua.HEDGE)

    def _key(self, provider: str, *parts: object) -> str:
        return ":".join((self._prefix, f"{{{provider}}}", *map(str, parts)))

    async def record(
        self, provider: str, outcome: Outcome, now: float, policy: Policy
    ) -> ProviderRecord:
        latency = outcome.latency_s if outcome.ok and outcome.latency_s is not None else -1.0
        current = int(now // policy.bucket_s)
        await self._record(
            keys=[
                self._key(provider, "rec"),
                self._key(provider, "w", current),
                *(self._key(provider, "w", i) for i in policy.buckets(now) if i != current),
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
                policy.trip_error_rate,
                "" if outcome.started_at is None else repr(outcome.started_at),
                "1" if outcome.probe else "0",
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
                price_usd=float(rec["price"]) if rec.get("price") else None,
                changed_at=_f(rec, "changed_at"),
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

    async def set_price(self, provider: str, price_usd: float | None) -> None:
        key = self._key(provider, "rec")
        if price_usd is None:
            await self._redis.hdel(key, "price")
        else:
            await self._redis.hset(key, "price", repr(price_usd))

    async def reset_breaker(self, provider: str, now: float | None = None) -> None:
        pipe = self._redis.pipeline(transaction=True)  # one slot: MULTI is atomic here
        pipe.hset(
            self._key(provider, "rec"),
            mapping={
                "state": "closed",
                "consec": 0,
                "opened": 0,
                "open_until": 0,
                "changed_at": repr(time.time() if now is None else now),
            },
        )
        pipe.hset(self._key(provider, "rec"), "cooldown_until", 0)
        pipe.delete(self._key(provider, "probe"))
        await pipe.execute()
        # Old failures must not trip it again at once: the window starts afresh.
        windows = [key async for key in self._redis.scan_iter(self._key(provider, "w", "*"))]
        if windows:
            await self._redis.delete(*windows)

    def _minute_key(self, now: float) -> str:
        return self._key("hedge", "m", int(now // 60))

    async def count_request(self, now: float) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hincrby(self._minute_key(now), "req", 1)
        pipe.expire(self._minute_key(now), 180)
        await pipe.execute()

    async def take_hedge(self, now: float, share: float, minimum: int) -> bool:
        return bool(await self._hedge(keys=[self._minute_key(now)], args=[share, minimum]))


class RedisClaims:
    """Atomic claims: idempotency keys and the cache's names, each its own slot."""

    def __init__(self, client: aioredis.Redis, prefix: str):
        self._redis = client
        self._prefix = prefix
        self._idem_begin = client.register_script(lua.IDEM_BEGIN)
        self._idem_renew = client.register_script(lua.IDEM_RENEW)
        self._idem_note = client.register_script(lua.IDEM_NOTE)
        self._idem_finish = client.register_script(lua.IDEM_FINISH)
        self._idem_release = client.register_script(lua.IDEM_RELEASE)

    def _idem_key(self, key: str) -> str:
        return f"{self._prefix}:idem:{{{key}}}"  # its own hash tag: one slot per key

    # Leases are timed by Redis's own clock (TIME in the scripts).
    async def idem_begin(
        self, key: str, fingerprint: str, lease_s: float, owner: str = ""
    ) -> IdemClaim:
        reply = await self._idem_begin(
            keys=[self._idem_key(key)],
            args=[fingerprint, int(lease_s * 1000), "", int(CLAIM_KEEP_S * 1000), owner],
        )
        state, response, *journal = reply
        return IdemClaim(state, response or "", dict(zip(journal[::2], journal[1::2], strict=True)))

    async def idem_renew(
        self,
        key: str,
        fingerprint: str,
        lease_s: float,
        owner: str = "",
        keep_s: float = CLAIM_KEEP_S,
    ) -> bool:
        return bool(
            await self._idem_renew(
                keys=[self._idem_key(key)],
                args=[fingerprint, owner, int(lease_s * 1000), int(keep_s * 1000)],
            )
        )

    async def idem_note(
        self, key: str, fingerprint: str, name: str, value: str, owner: str = ""
    ) -> bool:
        return bool(
            await self._idem_note(
                keys=[self._idem_key(key)], args=[fingerprint, owner, f"job:{name}", value]
            )
        )

    async def idem_finish(
        self, key: str, fingerprint: str, response: str, ttl_s: float, owner: str = ""
    ) -> bool:
        return bool(
            await self._idem_finish(
                keys=[self._idem_key(key)],
                args=[fingerprint, owner, response, int(ttl_s * 1000)],
            )
        )

    async def idem_release(self, key: str, fingerprint: str, owner: str = "") -> None:
        await self._idem_release(keys=[self._idem_key(key)], args=[fingerprint, owner])

    @functools.cached_property
    def _idem_drop(self) -> AsyncScript:
        return self._redis.register_script(lua.IDEM_DROP)

    async def idem_drop(self, key: str, fingerprint: str, response: str) -> bool:
        return bool(await self._idem_drop(keys=[self._idem_key(key)], args=[fingerprint, response]))


class RedisLedger:
    """Budgets and rates, the holds of requests in flight, the spend ledger: every key
    of an account under its hash tag, and the set of accounts."""

    def __init__(self, client: aioredis.Redis, prefix: str):
        self._redis = client
        self._prefix = prefix
        self._admit = client.register_script(lua.ADMIT)
        self._settle = client.register_script(lua.SETTLE)
        self._extend = client.register_script(lua.EXTEND)
        self._precheck = client.register_script(lua.PRECHECK)

    def _account_keys(self, account: str, now: float) -> tuple[str, str, str, str]:
        period = Period.of(now)
        base = f"{self._prefix}:acct:{{{account}}}"  # one slot per account
        return (
            f"{base}:inflight",
            f"{base}:rate",
            f"{base}:d:{period.day}",
            f"{base}:m:{period.month}",
        )

    async def precheck(self, account: str, quota: Quota, now: float) -> Admission:
        if quota.max_concurrent <= 0 and quota.requests_per_minute <= 0:
            return Admission()  # nothing to look at: no round trip
        inflight, rate, _, _ = self._account_keys(account, now)
        limit, retry = await self._precheck(
            keys=[inflight, rate],
            args=[repr(now), quota.requests_per_minute, quota.max_concurrent],
        )
        return Admission(limit or "", float(retry))

    async def admit(
        self,
        account: str,
        ticket: str,
        hold: Hold,
        quota: Quota,
        now: float,
        lease_s: float,
    ) -> Admission:
        period = Period.of(now)
        limit, retry, held = await self._admit(
            keys=list(self._account_keys(account, now)),
            args=[
                repr(now),
                ticket,
                hold.worst,
                repr(now + lease_s),
                quota.micros_per_day,
                quota.micros_per_month,
                quota.requests_per_minute,
                quota.max_concurrent,
                repr(period.day_left_s),
                repr(period.month_left_s),
                hold.least,
            ],
        )
        if not limit:
            await self._redis.sadd(f"{self._prefix}:accounts", account)
        return Admission(limit or "", float(retry), int(held))

    async def settle(
        self,
        account: str,
        ticket: str,
        micros: int,
        counts: Mapping[str, int],
        now: float,
        jobs: Sequence[JobCharge] = (),
    ) -> list[bool]:
        inflight, _, day, month = self._account_keys(account, now)
        base = inflight.rsplit(":", 1)[0]
        args: list[object] = [ticket, micros, len(counts)]
        for name, value in counts.items():
            args += [name, value]
        for charge in jobs:
            args += [charge.micros, len(charge.counts)]
            for name, value in charge.counts:
                args += [name, value]
        args.append(int(BILLED_JOB_KEEP_S))
        keys = [inflight, day, month, f"{base}:settled:{ticket}"]
        keys += [f"{base}:job:{charge.job}" for charge in jobs]
        answer = await self._settle(keys=keys, args=args)
        fresh = [bool(n) for n in answer[1:]]
        return fresh + [False] * (len(jobs) - len(fresh))  # already settled: none charged now

    async def extend(
        self, account: str, ticket: str, micros: int, quota: Quota, now: float, lease_s: float
    ) -> bool:
        inflight, _, day, month = self._account_keys(account, now)
        settled = f"{inflight.rsplit(':', 1)[0]}:settled:{ticket}"
        return bool(
            await self._extend(
                keys=[inflight, day, month, settled],
                args=[
                    repr(now),
                    ticket,
                    micros,
                    repr(now + lease_s),
                    quota.micros_per_day,
                    quota.micros_per_month,
                ],
            )
        )

    def unconfirmed(self) -> int:
        return 0  # every settle is in the ledger once it returns

    async def ledger(self, accounts: Sequence[str] | None, days: Sequence[str]) -> Ledger:
        names = (
            sorted(await self._redis.smembers(f"{self._prefix}:accounts"))
            if accounts is None
            else list(accounts)
        )
        pipe = self._redis.pipeline(transaction=False)
        for account in names:
            for day in days:
                pipe.hgetall(f"{self._prefix}:acct:{{{account}}}:d:{day}")
        replies: list[dict[str, str]] = await pipe.execute()
        out: Ledger = {}
        for n, account in enumerate(names):
            rows = replies[n * len(days) : (n + 1) * len(days)]
            out[account] = {
                day: {k: int(v) for k, v in row.items()}
                for day, row in zip(days, rows, strict=True)
                if row
            }
        return out


class RedisEvents:
    """The status page's per-minute event counters (kept two hours)."""

    def __init__(self, client: aioredis.Redis, prefix: str):
        self._redis = client
        self._prefix = prefix

    def _events_key(self, minute: int) -> str:
        return f"{self._prefix}:events:{minute}"

    async def count_events(self, now: float, events: Mapping[str, int]) -> None:
        key = self._events_key(int(now // 60))
        pipe = self._redis.pipeline(transaction=False)
        for name, value in events.items():
            pipe.hincrby(key, name, value)
        pipe.expire(key, 7200)
        await pipe.execute()

    async def recent_events(self, now: float, minutes: int) -> dict[str, int]:
        minute = int(now // 60)
        pipe = self._redis.pipeline(transaction=False)
        for m in range(minute - minutes + 1, minute + 1):
            pipe.hgetall(self._events_key(m))
        total: dict[str, int] = {}
        for row in await pipe.execute():
            for name, value in row.items():
                total[name] = total.get(name, 0) + int(value)
        return total


class RedisStore(ComposedStore):
    kind = "redis"

    def __init__(
        self, url: str, prefix: str = "upscale", timeout_s: float = 0.5, read_timeout_s: float = 2.5
    ):
        self._redis = connect(url, timeout_s, read_timeout_s)
        super().__init__(
            RedisHealth(self._redis, prefix),
            RedisClaims(self._redis, prefix),
            RedisLedger(self._redis, prefix),
            RedisEvents(self._redis, prefix),
        )

    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    async def aclose(self) -> None:
        await self._redis.aclose()
