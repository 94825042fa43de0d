"""Redis with an in-process fallback: routing never fails a request because Redis is away.
Every record also lands in the in-process view, so when Redis goes the gateway routes on
what it has seen itself; Redis is tried again a second later and resumes when it answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from redis.exceptions import RedisError

from gateway.state.base import (
    CLAIM_KEEP_S,
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
)
from gateway.state.memory import MemoryStore
from gateway.state.redis import RedisStore

log = logging.getLogger("gateway.state")
T = TypeVar("T")
_FAILURES = (RedisError, OSError, TimeoutError)


@dataclass(eq=False, slots=True)
class _Unsettled:
    """Spend Redis has not confirmed: one request's settle, or an aggregate of one account's
    settles of one UTC day under a ticket of its own."""

    account: str
    ticket: str
    micros: int
    counts: Counter[str]
    now: float  # decides the ledger's day and month (any instant of `day` gives the same)
    day: str
    settles: int = 1
    aggregate: bool = False
    # Sent to Redis at least once, so it may have landed: from then on it keeps its ticket
    # (a retry that had landed counts once) and takes nothing more into it.
    sent: bool = False
    # Provider jobs Redis charges only if no settle charged them before: only those this
    # replica's own view charged (ResilientStore.settle), so an aggregate counts them all.
    jobs: tuple[JobCharge, ...] = ()

    def folded(self) -> tuple[int, Counter[str]]:
        """Micros and counters with the jobs charged: an aggregate keeps no job list (its
        memory stays bounded through a long outage), so a job two replicas both followed
        meanwhile may count twice, never not at all."""
        micros, counts = self.micros, Counter(self.counts)
        for charge in self.jobs:
            micros += charge.micros
            counts.update(dict(charge.counts))
        return micros, counts

    def merged(self) -> _Unsettled:
        """A new aggregate holding this settle, under a ticket of its own."""
        micros, counts = self.folded()
        return _Unsettled(
            self.account,
            f"agg-{secrets.token_hex(12)}",
            micros,
            counts,
            self.now,
            self.day,
            self.settles,
            aggregate=True,
        )

    def add(self, other: _Unsettled) -> None:
        micros, counts = other.folded()
        self.micros += micros
        self.counts.update(counts)
        self.settles += other.settles

    def line(self) -> str:
        micros, counts = self.folded()
        return orjson.dumps(
            {
                "event": "unsettled_spend",
                "account": self.account,
                "day": self.day,
                "ticket": self.ticket,
                "micros": micros,
                "counts": dict(counts),
                "settles": self.settles,
                "now": self.now,
                "maybe_landed": self.sent,
            }
        ).decode()


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
        # Spend Redis has not confirmed, in order; the settler retries it. Past max_unsettled
        # entries, settles not yet sent merge per (account, UTC day) into aggregates, so memory
        # is bounded by those pairs and nothing is dropped. At aclose the backlog has
        # close_flush_s to reach Redis; what does not is logged at ERROR, one JSON line an
        # entry, for an operator to replay (with its ticket, so it counts once).
        self._unsettled: deque[_Unsettled] = deque()
        self._open: dict[tuple[str, str], _Unsettled] = {}  # aggregates not yet sent
        self._loose = 0  # entries neither sent nor merged
        self.max_unsettled = 10_000
        self.close_flush_s = 5.0
        self._settler: asyncio.Task[None] | None = None
        self._closing = False  # aclose flushes: no settler may send beside it
        self._finishing: set[asyncio.Task[None]] = set()  # claims' finishes Redis missed
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
        """Redis, or the fallback. Money and claims (the calls that pass their own, longer
        `timeout_s`) always try Redis: one slow routing read must not send them to the
        in-process view for the next second."""
        if timeout_s is None and time.monotonic() < self._down_until:
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
    async def idem_begin(
        self, key: str, fingerprint: str, lease_s: float, owner: str = ""
    ) -> IdemClaim:
        return await self._remote(
            lambda: self.primary.idem_begin(key, fingerprint, lease_s, owner),
            lambda: self.local.idem_begin(key, fingerprint, lease_s, owner),
            self._money_timeout_s,
        )

    # A claim made in Redis cannot be confirmed while Redis is away: a renewal raises
    # (the claimant stops submitting once a lease has passed unconfirmed, since a retry on
    # a replica that reaches Redis may take the claim over), a note says "not journaled"
    # (the job is then cancelled when given up on, never left to an owner who cannot see
    # it), and a finish is retried until it lands. A claim made during the outage lives in
    # the in-process view, which then answers.
    async def idem_renew(
        self,
        key: str,
        fingerprint: str,
        lease_s: float,
        owner: str = "",
        keep_s: float = CLAIM_KEEP_S,
    ) -> bool:
        local = await self.local.idem_renew(key, fingerprint, lease_s, owner, keep_s)

        async def unconfirmed() -> bool:
            if local:
                return True
            raise ConnectionError("the claim's renewal could not reach Redis")

        return await self._remote(
            lambda: self.primary.idem_renew(key, fingerprint, lease_s, owner, keep_s),
            unconfirmed,
            self._money_timeout_s,
        )

    async def idem_note(
        self, key: str, fingerprint: str, name: str, value: str, owner: str = ""
    ) -> bool:
        local = await self.local.idem_note(key, fingerprint, name, value, owner)

        async def keep_local() -> bool:
            return local

        return await self._remote(
            lambda: self.primary.idem_note(key, fingerprint, name, value, owner),
            keep_local,
            self._money_timeout_s,
        )

    async def idem_finish(
        self, key: str, fingerprint: str, response: str, ttl_s: float, owner: str = ""
    ) -> bool:
        local = await self.local.idem_finish(key, fingerprint, response, ttl_s, owner)

        async def call() -> bool:
            return await self.primary.idem_finish(key, fingerprint, response, ttl_s, owner)

        async def later() -> bool:
            if local:
                return True
            task = asyncio.create_task(self._finish_later(call))
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)
            return True

        return await self._remote(call, later, self._money_timeout_s)

    async def _finish_later(self, call: Callable[[], Awaitable[bool]]) -> None:
        """A finished claim left pending in Redis would be taken over and run again."""
        for _ in range(120):
            await asyncio.sleep(self._retry_after_s)
            try:
                await asyncio.wait_for(call(), self._money_timeout_s)
            except _FAILURES:
                continue
            return
        log.error("an idempotent request's result could not be stored in Redis")

    async def idem_release(self, key: str, fingerprint: str, owner: str = "") -> None:
        await self.local.idem_release(key, fingerprint, owner)
        await self._remote(lambda: self.primary.idem_release(key, fingerprint, owner), _nothing)

    async def idem_drop(self, key: str, fingerprint: str, response: str) -> bool:
        local = await self.local.idem_drop(key, fingerprint, response)

        async def keep_local() -> bool:
            return local

        return await self._remote(
            lambda: self.primary.idem_drop(key, fingerprint, response),
            keep_local,
            self._money_timeout_s,
        )

    async def set_price(self, provider: str, price_usd: float | None) -> None:
        await self.local.set_price(provider, price_usd)
        await self._remote(lambda: self.primary.set_price(provider, price_usd), _nothing)

    async def reset_breaker(self, provider: str) -> None:
        await self.local.reset_breaker(provider)
        await self._remote(lambda: self.primary.reset_breaker(provider), _nothing)

    # Rates and requests in flight: while Redis is away each replica applies them on its
    # own view. USD budgets too, unless `quota.shared_only`: then the request is refused,
    # because what the other replicas spend meanwhile is unknown here.
    async def precheck(self, account: str, quota: Quota, now: float) -> Admission:
        async def fallback() -> Admission:
            # Only a look: with the shared store away, admission after the body decides.
            return await self.local.precheck(account, quota, now)

        return await self._remote(lambda: self.primary.precheck(account, quota, now), fallback)

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

    async def extend(
        self, account: str, ticket: str, micros: int, quota: Quota, now: float, lease_s: float
    ) -> bool:
        local = await self.local.extend(account, ticket, micros, quota, now, lease_s)

        async def fallback() -> bool:
            # As for admission: a budget that only the shared view can check is refused.
            return local and not (quota.shared_only and quota.has_budget)

        return await self._remote(
            lambda: self.primary.extend(account, ticket, micros, quota, now, lease_s),
            fallback,
            self._money_timeout_s,
        )

    async def settle(
        self,
        account: str,
        ticket: str,
        micros: int,
        counts: Mapping[str, int],
        now: float,
        jobs: Sequence[JobCharge] = (),
    ) -> list[bool]:
        """Kept until Redis has it: settling is idempotent per ticket, so a retry after a
        timeout that did land counts once. While earlier spend waits for Redis, this one
        waits behind it (only the settler sends, so what may merge was never sent)."""
        local = await self.local.settle(account, ticket, micros, counts, now, jobs)
        # A job this replica's view has charged before went to Redis with that earlier
        # settle, or into an aggregate that carries no job list: sent again, Redis would
        # find no marker for the folded one and charge it twice. Only fresh jobs go on.
        fresh = tuple(charge for charge, new in zip(jobs, local, strict=True) if new)
        entry = _Unsettled(
            account,
            ticket,
            micros,
            Counter(counts),
            now,
            Period.of(now).day,
            jobs=fresh,
        )
        if self._unsettled:
            self._keep(entry)
            return local

        async def remote() -> list[bool]:
            entry.sent = True
            charged = iter(await self.primary.settle(account, ticket, micros, counts, now, fresh))
            return [new and next(charged, False) for new in local]

        async def later() -> list[bool]:
            self._keep(entry)
            return local  # what is charged here: Redis decides again when it lands

        return await self._remote(remote, later, self._money_timeout_s)

    def _keep(self, entry: _Unsettled) -> None:
        if entry.sent or len(self._unsettled) < self.max_unsettled:
            self._unsettled.append(entry)
            self._loose += not entry.sent
        else:
            if self._loose:
                self._compact()
            into = self._open.get((entry.account, entry.day))
            if into is None:
                self._open[(entry.account, entry.day)] = into = entry.merged()
                self._unsettled.append(into)
            else:
                into.add(entry)
        if not self._closing and (self._settler is None or self._settler.done()):
            self._settler = asyncio.create_task(self._settle_later())

    def _compact(self) -> None:
        """Merge every entry not yet sent into its (account, day)'s aggregate."""
        kept: deque[_Unsettled] = deque()
        for entry in self._unsettled:
            if entry.sent or entry.aggregate:
                kept.append(entry)
                continue
            into = self._open.get((entry.account, entry.day))
            if into is None:
                self._open[(entry.account, entry.day)] = into = entry.merged()
                kept.append(into)
            else:
                into.add(entry)
        self._unsettled = kept
        self._loose = 0

    async def _settle_later(self) -> None:
        while self._unsettled and not self._closing:
            await asyncio.sleep(self._retry_after_s)
            await self._flush()

    async def _flush(self) -> bool:
        """Send the backlog in order: True once Redis has all of it, False at a failure."""
        while self._unsettled:
            entry = self._unsettled[0]
            if not entry.sent:
                entry.sent = True
                if entry.aggregate:
                    del self._open[(entry.account, entry.day)]
                else:
                    self._loose -= 1
            try:
                # Not wait_for: on 3.11 it can swallow a cancel that comes as the call ends,
                # and aclose waits for the cancelled settler.
                async with asyncio.timeout(self._money_timeout_s):
                    await self.primary.settle(
                        entry.account,
                        entry.ticket,
                        entry.micros,
                        dict(entry.counts),
                        entry.now,
                        entry.jobs,
                    )
            except _FAILURES as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"[:200]
                return False
            self._unsettled.remove(entry)  # by identity; a merge may have rebuilt the deque
        return True

    def unconfirmed(self) -> int:
        return len(self._unsettled)  # the settler retries them until Redis has them

    async def ledger(self, accounts: Sequence[str] | None, days: Sequence[str]) -> Ledger:
        # Spend as /v1/usage and /admin/spend report it: only the shared view has every
        # replica's, so it waits as long as budgets do before answering with this one's.
        return await self._remote(
            lambda: self.primary.ledger(accounts, days),
            lambda: self.local.ledger(accounts, days),
            self._money_timeout_s,
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
        """Close Redis, after giving the unsettled spend close_flush_s to reach it: what
        cannot is logged at ERROR, never dropped silently."""
        self._closing = True
        if self._settler is not None:
            self._settler.cancel()
            await asyncio.gather(self._settler, return_exceptions=True)
        if self._unsettled:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.close_flush_s):
                    while True:
                        if await self._flush():
                            break
                        await asyncio.sleep(min(self._retry_after_s, 0.25))
            if self._loose:
                self._compact()  # one line per (account, day), besides entries already sent
            for entry in self._unsettled:
                log.error(entry.line())
            if self._unsettled:
                log.error(
                    "%d unsettled spend entries (%d micro-USD) could not reach Redis at "
                    "shutdown: replay the unsettled_spend lines above with their tickets",
                    len(self._unsettled),
                    sum(e.folded()[0] for e in self._unsettled),
                )
        for finishing in self._finishing:
            finishing.cancel()
        if self._finishing:
            log.error("%d idempotent results not stored in Redis at shutdown", len(self._finishing))
        await self.primary.aclose()


async def _nothing() -> Any:
    return None


async def _false() -> bool:
    return False
