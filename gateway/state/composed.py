"""A state store made of one part per concern (base.py): `MemoryStore` and `RedisStore` are
this over their own parts. Every operation is its part's; this only hands it on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from gateway.state.base import (
    CLAIM_KEEP_S,
    Admission,
    ClaimStore,
    EventStore,
    HealthStore,
    Hold,
    IdemClaim,
    JobCharge,
    Ledger,
    LedgerStore,
    Outcome,
    Policy,
    ProviderRecord,
    Quota,
)


class TimedHealth(HealthStore, Protocol):
    """The health part as both implementations have it: a reset may be given its instant
    (the breaker's reference-model test drives the clock)."""

    async def reset_breaker(self, provider: str, now: float | None = None) -> None: ...


class ComposedStore:
    def __init__(
        self, health: TimedHealth, claims: ClaimStore, budgets: LedgerStore, events: EventStore
    ):
        self.health = health
        self.claims = claims
        self.budgets = budgets  # the LedgerStore part (`ledger` is one of its operations)
        self.events = events

    # HealthStore

    async def record(
        self, provider: str, outcome: Outcome, now: float, policy: Policy
    ) -> ProviderRecord:
        return await self.health.record(provider, outcome, now, policy)

    async def snapshot(
        self, providers: Sequence[str], now: float, policy: Policy
    ) -> dict[str, ProviderRecord]:
        return await self.health.snapshot(providers, now, policy)

    async def try_probe(self, provider: str, token: str, ttl_s: float) -> bool:
        return await self.health.try_probe(provider, token, ttl_s)

    async def release_probe(self, provider: str, token: str) -> None:
        await self.health.release_probe(provider, token)

    async def set_cooldown(self, provider: str, until: float) -> None:
        await self.health.set_cooldown(provider, until)

    async def set_drained(self, provider: str, drained: bool) -> None:
        await self.health.set_drained(provider, drained)

    async def set_price(self, provider: str, price_usd: float | None) -> None:
        await self.health.set_price(provider, price_usd)

    async def reset_breaker(self, provider: str, now: float | None = None) -> None:
        await self.health.reset_breaker(provider, now)

    async def take_hedge(self, now: float, share: float, minimum: int) -> bool:
        return await self.health.take_hedge(now, share, minimum)

    async def count_request(self, now: float) -> None:
        await self.health.count_request(now)

    # ClaimStore

    async def idem_begin(
        self, key: str, fingerprint: str, lease_s: float, owner: str = ""
    ) -> IdemClaim:
        return await self.claims.idem_begin(key, fingerprint, lease_s, owner)

    async def idem_renew(
        self,
        key: str,
        fingerprint: str,
        lease_s: float,
        owner: str = "",
        keep_s: float = CLAIM_KEEP_S,
    ) -> bool:
        return await self.claims.idem_renew(key, fingerprint, lease_s, owner, keep_s)

    async def idem_note(
        self, key: str, fingerprint: str, name: str, value: str, owner: str = ""
    ) -> bool:
        return await self.claims.idem_note(key, fingerprint, name, value, owner)

    async def idem_finish(
        self, key: str, fingerprint: str, response: str, ttl_s: float, owner: str = ""
    ) -> bool:
        return await self.claims.idem_finish(key, fingerprint, response, ttl_s, owner)

    async def idem_release(self, key: str, fingerprint: str, owner: str = "") -> None:
        await self.claims.idem_release(key, fingerprint, owner)

    async def idem_drop(self, key: str, fingerprint: str, response: str) -> bool:
        return await self.claims.idem_drop(key, fingerprint, response)

    # LedgerStore

    async def precheck(self, account: str, quota: Quota, now: float) -> Admission:
        return await self.budgets.precheck(account, quota, now)

    async def admit(
        self, account: str, ticket: str, hold: Hold, quota: Quota, now: float, lease_s: float
    ) -> Admission:
        return await self.budgets.admit(account, ticket, hold, quota, now, lease_s)

    async def settle(
        self,
        account: str,
        ticket: str,
        micros: int,
        counts: Mapping[str, int],
        now: float,
        jobs: Sequence[JobCharge] = (),
    ) -> list[bool]:
        return await self.budgets.settle(account, ticket, micros, counts, now, jobs)

    async def extend(
        self, account: str, ticket: str, micros: int, quota: Quota, now: float, lease_s: float
    ) -> bool:
        return await self.budgets.extend(account, ticket, micros, quota, now, lease_s)

    async def ledger(self, accounts: Sequence[str] | None, days: Sequence[str]) -> Ledger:
        return await self.budgets.ledger(accounts, days)

    def unconfirmed(self) -> int:
        return self.budgets.unconfirmed()

    # EventStore

    async def count_events(self, now: float, events: Mapping[str, int]) -> None:
        await self.events.count_events(now, events)

    async def recent_events(self, now: float, minutes: int) -> dict[str, int]:
        return await self.events.recent_events(now, minutes)
