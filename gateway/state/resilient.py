"""Redis with an in-process fallback: routing never fails a request because Redis is away.
Every record also lands in the in-process view, so when Redis goes the gateway routes on
what it has seen itself; Redis is tried again a second later and resumes when it answers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis.exceptions import RedisError

from gateway.state.base import IdemClaim, Outcome, Policy, ProviderRecord
from gateway.state.memory import MemoryStore
from gateway.state.redis import RedisStore

log = logging.getLogger("gateway.state")
T = TypeVar("T")
_FAILURES = (RedisError, OSError, TimeoutError)


class ResilientStore:
    kind = "redis"

    def __init__(self, primary: RedisStore, retry_after_s: float = 1.0, timeout_s: float = 0.5):
        self.primary = primary
        self.local = MemoryStore()
        self._retry_after_s = retry_after_s
        self._timeout_s = timeout_s
        self._down_until = 0.0
        self.degraded = False
        self.last_error = ""
        self.on_change: Callable[[bool], None] | None = None

    async def _remote(
        self, call: Callable[[], Awaitable[T]], fallback: Callable[[], Awaitable[T]]
    ) -> T:
        if time.monotonic() < self._down_until:
            return await fallback()
        try:
            result = await asyncio.wait_for(call(), self._timeout_s)
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
    async def idem_begin(self, key: str, fingerprint: str, lease_s: float) -> IdemClaim:
        return await self._remote(
            lambda: self.primary.idem_begin(key, fingerprint, lease_s),
            lambda: self.local.idem_begin(key, fingerprint, lease_s),
        )

    async def idem_finish(self, key: str, fingerprint: str, response: str, ttl_s: float) -> None:
        await self.local.idem_finish(key, fingerprint, response, ttl_s)
        await self._remote(
            lambda: self.primary.idem_finish(key, fingerprint, response, ttl_s), _nothing
        )

    async def idem_release(self, key: str, fingerprint: str) -> None:
        await self.local.idem_release(key, fingerprint)
        await self._remote(lambda: self.primary.idem_release(key, fingerprint), _nothing)

    async def ping(self) -> bool:
        return await self._remote(self.primary.ping, _false)

    async def aclose(self) -> None:
        await self.primary.aclose()


async def _nothing() -> Any:
    return None


async def _false() -> bool:
    return False
