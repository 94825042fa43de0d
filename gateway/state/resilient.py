"""Redis with an in-process fallback: routing never fails a request because Redis is away.
Every record also lands in the in-process view, so when Redis goes the gateway routes on
what it has seen itself; Redis is tried again a second later and resumes when it answers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from redis.exceptions import RedisError

from gateway.state.base import (
    Admission,
    Hold,
    IdemClaim,
    Ledger,
    Outcome,
    Policy,
    ProviderRecord,
    Quota,
)
from gateway.state.memory import MemoryStore
from gateway.state.redis import RedisStore

log = logging.getLogger("gateway.state")
T = TypeVar("T")
_FAILURES = (RedisError, OSError, TimeoutError)


class ResilientStore:
    kind = "redis"

    def __init__(
        self,
        primary: RedisStore,
        retry_after_s: float = 1.0,
        timeout_s: float = 0.5,
        money_timeout_s: float = 2.0,
    ):
        self.primary = primary
        self.local = MemoryStore()
        self._retry_after_s = retry_after_s
        self._timeout_s = timeout_s
        # Budgets and idempotency wait longer: a replica whose loop is merely busy must not
        # decide on its own view what only the shared view can decide.
        self._money_timeout_s = money_timeout_s
        self._unsettled: list[Callable[[], Awaitable[None]]] = []
        self._settler: asyncio.Task[None] | None = None
        self._down_until = 0.0
        self.degraded = False
        self.last_error = ""
        self.on_change: Callable[[bool], None] | None = None

    async def _remote(
        self,
        call: Callable[[], Awaitable[T]],
        fallback: Callable[[], Awaitable[T]],
        timeout_s: float | None = None,
    ) -> T:
        if time.monotonic() < self._down_until:
            return await fallback()
        try:
            result = await asyncio.wait_for(call(), timeout_s or self._timeout_s)
        except _FAILURES as exc:
            self._down_until = time.monotonic() + self._retry_after_s
            self.last_error = f"{type(exc).__name__}: {exc}"[:200]
            if not self.degraded:
                log.warning(
                    "redis unreachable (%s): routing on the in-process view", self.last_error
                )
                self._set_degraded(True)
            return await fallback()
        if self.degraded:
            log.warning("redis is back: shared routing state resumes")
            self._set_degraded(False)
        return result

    def _set_degraded(self, degraded: bool) -> None:
        self.degraded = degraded
        if self.on_change:
            self.on_change(degraded)

    async def record(
        self, provider: str, outcome: Outcome, now: float, policy: Policy
    ) -> ProviderRecord:
        local = await self.local.record(provider, outcome, now, policy)

        async def keep_local() -> ProviderRecord:
            return local

        return await self._remote(
            lambda: self.primary.record(provider, outcome, now, policy), keep_local
        )

    async def snapshot(
        self, providers: Sequence[str], now: float, policy: Policy
    ) -> dict[str, ProviderRecord]:
        return await self._remote(
            lambda: self.primary.snapshot(providers, now, policy),
            lambda: self.local.snapshot(providers, now, policy),
        )

    async def try_probe(self, provider: str, token: str, ttl_s: float) -> bool:
        return await self._remote(
            lambda: self.primary.try_probe(provider, token, ttl_s),
            lambda: self.local.try_probe(provider, token, ttl_s),
        )

    async def release_probe(self, provider: str, token: str) -> None:
        await self.local.release_probe(provider, token)
        await self._remote(lambda: self.primary.release_probe(provider, token), _nothing)

    async def set_cooldown(self, provider: str, until: float) -> None:
        await self.local.set_cooldown(provider, until)
        await self._remote(lambda: self.primary.set_cooldown(provider, until), _nothing)

    async def set_drained(self, provider: str, drained: bool) -> None:
        await self.local.set_drained(provider, drained)
        await self._remote(lambda: self.primary.set_drained(provider, drained), _nothing)

    async def count_request(self, now: float) -> None:
        await self.local.count_request(now)
        await self._remote(lambda: self.primary.count_request(now), _nothing)

    async def take_hedge(self, now: float, share: float, minimum: int) -> bool:
        return await self._remote(
            lambda: self.primary.take_hedge(now, share, minimum),
            lambda: self.local.take_hedge(now, share, minimum),
        )

    # Idempotency keys live in Redis; while it is away, each replica keeps its own, so a
    # retry that lands on another replica during the outage may run again.
    async def idem_begin(self, key: str, fingerprint: str, lease_s: float, now: float) -> IdemClaim:
        return await self._remote(
            lambda: self.primary.idem_begin(key, fingerprint, lease_s, now),
            lambda: self.local.idem_begin(key, fingerprint, lease_s, now),
            self._money_timeout_s,
        )

    async def idem_renew(self, key: str, fingerprint: str, lease_s: float, now: float) -> None:
        await self.local.idem_renew(key, fingerprint, lease_s, now)
        await self._remote(
            lambda: self.primary.idem_renew(key, fingerprint, lease_s, now), _nothing
        )

    async def idem_note(self, key: str, fingerprint: str, name: str, value: str) -> None:
        await self.local.idem_note(key, fingerprint, name, value)
        await self._remote(
            lambda: self.primary.idem_note(key, fingerprint, name, value),
            _nothing,
            self._money_timeout_s,
        )

    async def idem_finish(self, key: str, fingerprint: str, response: str, ttl_s: float) -> None:
        await self.local.idem_finish(key, fingerprint, response, ttl_s)
        await self._remote(
            lambda: self.primary.idem_finish(key, fingerprint, response, ttl_s),
            _nothing,
            self._money_timeout_s,
        )

    async def idem_release(self, key: str, fingerprint: str) -> None:
        await self.local.idem_release(key, fingerprint)
        await self._remote(lambda: self.primary.idem_release(key, fingerprint), _nothing)

    async def set_price(self, provider: str, price_usd: float | None) -> None:
        await self.local.set_price(provider, price_usd)
        await self._remote(lambda: self.primary.set_price(provider, price_usd), _nothing)

    async def reset_breaker(self, provider: str) -> None:
        await self.local.reset_breaker(provider)
        await self._remote(lambda: self.primary.reset_breaker(provider), _nothing)

    # Rates and requests in flight: while Redis is away each replica applies them on its
    # own view. USD budgets too, unless `quota.shared_only`: then the request is refused,
    # because what the other replicas spend meanwhile is unknown here.
    async def admit(
        self, account: str, ticket: str, hold: Hold, quota: Quota, now: float, lease_s: float
    ) -> Admission:
        async def fallback() -> Admission:
            if quota.shared_only and quota.has_budget:
                return Admission("state_store_unavailable", self._retry_after_s)
            return await self.local.admit(account, ticket, hold, quota, now, lease_s)

        return await self._remote(
            lambda: self.primary.admit(account, ticket, hold, quota, now, lease_s),
            fallback,
            self._money_timeout_s,
        )

    async def settle(
        self, account: str, ticket: str, micros: int, counts: Mapping[str, int], now: float
    ) -> None:
        """Kept until Redis has it: settling is idempotent per ticket, so a retry after a
        timeout that did land counts once."""
        await self.local.settle(account, ticket, micros, counts, now)

        async def remote() -> None:
            await self.primary.settle(account, ticket, micros, counts, now)

        async def later() -> None:
            if len(self._unsettled) < 100_000:
                self._unsettled.append(remote)
            if self._settler is None or self._settler.done():
                self._settler = asyncio.create_task(self._settle_later())

        await self._remote(remote, later, self._money_timeout_s)

    async def _settle_later(self) -> None:
        while self._unsettled:
            await asyncio.sleep(self._retry_after_s)
            while self._unsettled:
                try:
                    await asyncio.wait_for(self._unsettled[0](), self._money_timeout_s)
                except _FAILURES:
                    break
                self._unsettled.pop(0)

    async def ledger(self, accounts: Sequence[str] | None, days: Sequence[str]) -> Ledger:
        return await self._remote(
            lambda: self.primary.ledger(accounts, days),
            lambda: self.local.ledger(accounts, days),
        )

    async def count_events(self, now: float, events: Mapping[str, int]) -> None:
        await self.local.count_events(now, events)
        await self._remote(lambda: self.primary.count_events(now, events), _nothing)

    async def recent_events(self, now: float, minutes: int) -> dict[str, int]:
        return await self._remote(
            lambda: self.primary.recent_events(now, minutes),
            lambda: self.local.recent_events(now, minutes),
        )

    async def ping(self) -> bool:
        return await self._remote(self.primary.ping, _false)

    async def aclose(self) -> None:
        if self._settler is not None:
            self._settler.cancel()
        await self.primary.aclose()


async def _nothing() -> Any:
    return None


async def _false() -> bool:
    return False
