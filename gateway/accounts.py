"""Client keys as accounts: budgets (USD a day and a month), requests a minute, requests in
flight, and the spend ledger per key, provider and day.

A request is admitted by one atomic store operation (a Lua script on Redis) that checks every
limit and takes a lease holding the request's worst-case cost, so replicas admitting at once
can never together pass a budget: what is spent plus what is held stays under it. When the
request ends, the lease is settled with what the providers billed: every job that reached a
billed state, served or not (spoiled outputs, hedge losers, siblings of a failed image and
abandoned jobs that finished anyway are counted and marked), each job once even when two
requests followed it. A request whose abandoned jobs are still being confirmed answers at
once; its lease holds until they end, then it settles."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.config import ClientsConfig, KeyLimits
from gateway.errors import QuotaExceeded, RateLimited, StateUnavailable
from gateway.metrics import Metrics
from gateway.routing.spend import SERVED, Spend
from gateway.state.base import Hold, JobCharge, Ledger, LedgerStore, Period, Quota, days_back

log = logging.getLogger("gateway.accounts")
MICROS = 1_000_000
OPEN_ACCOUNT = "open"  # every request's account when no client key is configured


def micros(usd: float) -> int:
    return round(usd * MICROS)


def usd(amount: int) -> float:
    return round(amount / MICROS, 6)


@dataclass(slots=True)
class Bill:
    """What one admitted request cost, filled in as it runs."""

    # Only the cheapest plan fitted the budget: route to the cheapest providers, no hedge.
    cheapest_only: bool = False
    held: int = 0  # micro-USD the request's lease holds against its key's budgets
    spend: Spend = field(default_factory=Spend)  # the jobs the providers billed
    images: Counter[str] = field(default_factory=Counter)  # provider -> images served
    counts: Counter[str] = field(default_factory=Counter)  # cache_hits, coalesced, ...

    def served(self, provider: str) -> None:
        self.images[provider] += 1


# How long a finished request's bill waits for its abandoned jobs' follow-ups (each is
# bounded by its adapter, at about half of this).
CONFIRM_WAIT_S = 90.0


class Accounts:
    def __init__(
        self, store: LedgerStore, clients: ClientsConfig, lease_s: float, metrics: Metrics
    ):
        self._store = store
        self._clients = clients
        self._metrics = metrics
        # A replica that dies mid-request frees its hold after this; a bill waiting on its
        # follow-ups renews nothing, so the lease covers that wait too.
        self._lease_s = lease_s + CONFIRM_WAIT_S
        self._settling: set[asyncio.Task[None]] = set()
        self._open = 0  # bills admitted here and not settled yet: they may still spend
        self._here: Counter[str] = Counter()  # requests of each key in this process

    @contextlib.contextmanager
    def arriving(self, account: str) -> Iterator[None]:
        """A request of `account` from before its body is read to its end. A key with
        `max_concurrent` gets its 429 here, before megabytes of body are read, once that many
        of its requests are already in this process (the shared admission, after the body,
        counts every replica's)."""
        cap = self.limits(account).max_concurrent
        if cap and self._here[account] >= cap:
            raise self._refusal(account, "max_concurrent", 1.0)
        self._here[account] += 1
        try:
            yield
        finally:
            self._here[account] -= 1
            if not self._here[account]:
                del self._here[account]

    async def precheck(self, account: str) -> None:
        """Refuse, before its body is read, a request its key's rate or concurrency (across
        every replica) would refuse after: a key at its limit cannot make the gateway read
        megabytes only to answer 429."""
        quota = self._quota(account)
        if quota.max_concurrent or quota.requests_per_minute:
            admission = await self._store.precheck(account, quota, time.time())
            if admission.limit:
                raise self._refusal(account, admission.limit, admission.retry_after_s)

    def limits(self, account: str) -> KeyLimits:
        named = self._clients.keys.get(account)
        return named if named is not None else self._clients.defaults

    def _quota(self, account: str) -> Quota:
        limits = self.limits(account)
        return Quota(
            micros_per_day=-1 if limits.usd_per_day is None else micros(limits.usd_per_day),
            micros_per_month=-1 if limits.usd_per_month is None else micros(limits.usd_per_month),
            requests_per_minute=limits.requests_per_minute or 0,
            max_concurrent=limits.max_concurrent or 0,
            shared_only=self._clients.budgets_fail_closed,
        )

    @contextlib.asynccontextmanager
    async def admitted(
        self, account: str, worst_usd: float, least_usd: float
    ) -> AsyncIterator[Bill]:
        """Admit a request that may cost up to `worst_usd` (or `least_usd` on its cheapest
        plan, when only that fits the budget), or raise the 429 that refuses it."""
        ticket = secrets.token_hex(12)
        hold = Hold(micros(worst_usd), micros(least_usd))
        admission = await self._store.admit(
            account, ticket, hold, self._quota(account), time.time(), self._lease_s
        )
        if admission.limit:
            raise self._refusal(account, admission.limit, admission.retry_after_s)
        bill = Bill(cheapest_only=admission.held < hold.worst, held=admission.held)
        bill.spend.guard = lambda usd_total: self._cover(account, ticket, bill, usd_total)
        renewal = asyncio.create_task(self._renew(account, ticket, bill))
        failed = False
        self._open += 1
        try:
            yield bill
        except BaseException:
            failed = True
            raise
        finally:
            # Settled even when the client went away: the providers' charges stand. Jobs
            # still being cancelled may bill yet: the hold stays until they have ended.
            # Tracked either way, so that shutdown waits for it even when this request's
            # task is cancelled while it settles.
            task = asyncio.create_task(self._settle(account, ticket, bill, failed, renewal))
            self._settling.add(task)
            task.add_done_callback(self._settled)
            if not bill.spend.unsettled:
                await asyncio.shield(task)

    async def _cover(self, account: str, ticket: str, bill: Bill, usd_total: float) -> None:
        """Grow the request's hold to what it may now bill (a failover after a job that
        billed), or refuse the attempt: spent plus held never passes a budget."""
        amount = micros(usd_total)
        if amount <= bill.held:
            return
        quota = self._quota(account)
        if not await self._store.extend(account, ticket, amount, quota, time.time(), self._lease_s):
            raise QuotaExceeded(
                f"Key '{account}' has not enough budget left for another provider attempt "
                f"after the {usd(bill.held):g} USD this request already holds; it resets at "
                "00:00 UTC (daily) or on the 1st (monthly).",
            )
        bill.held = amount

    async def _renew(self, account: str, ticket: str, bill: Bill) -> None:
        """Keep the request's hold while it (and its follow-ups) run: image work may queue
        past the lease, and a hold that lapsed would let others spend what it bills."""
        while True:
            await asyncio.sleep(self._lease_s / 3)
            with contextlib.suppress(Exception):  # the next renewal may get through
                await self._store.extend(
                    account, ticket, bill.held, self._quota(account), time.time(), self._lease_s
                )

    async def _settle(
        self, account: str, ticket: str, bill: Bill, failed: bool, renewal: asyncio.Task[None]
    ) -> None:
        try:
            await self._settle_when_followed(account, ticket, bill, failed)
        finally:
            renewal.cancel()

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._settling.discard(task)
        self._open -= 1

    @property
    def unsettled(self) -> int:
        """Bills of this replica that may still add to the ledger (a request running, one
        waiting on the follow-ups of jobs it abandoned, or one settled while Redis was away
        and not yet confirmed); 0: this replica's ledger entries are final."""
        return self._open + self._store.unconfirmed()

    async def _settle_when_followed(
        self, account: str, ticket: str, bill: Bill, failed: bool
    ) -> None:
        if not await bill.spend.settled(CONFIRM_WAIT_S):
            log.error(
                "account %s: follow-ups of abandoned jobs still running after %.0f s; "
                "settled without what they may still find",
                account,
                CONFIRM_WAIT_S,
            )
        charges = list(bill.spend.charges)
        counts: Counter[str] = Counter(bill.counts)
        counts["failed" if failed else "requests"] += 1
        for provider, images in bill.images.items():
            counts[f"images:{provider}"] += images
        # Each job once, across requests: a claimant and the request that took its claim
        # over may both have followed one job. The store decides in the same step as it
        # adds to the ledger, so a replica that dies mid-settle leaves no job marked billed
        # and uncharged.
        jobs = [
            JobCharge(
                f"{c.provider}:{c.job_id}",
                micros(c.usd),
                (
                    (f"micros:{c.provider}", micros(c.usd)),
                    *(((f"{c.kind}:{c.provider}", 1),) if c.kind != SERVED else ()),
                ),
            )
            for c in charges
        ]
        fresh = await self._store.settle(account, ticket, 0, dict(counts), time.time(), jobs)
        for charge, new in zip(charges, fresh, strict=True):
            if new:  # paid for here: the counter follows the ledger
                self._metrics.spend.labels(charge.provider).inc(usd(micros(charge.usd)))

    async def drain(self) -> None:
        """At shutdown: the bills still waiting on follow-ups settle before the store closes."""
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

    def _refusal(self, account: str, limit: str, retry_after_s: float) -> Exception:
        limits = self.limits(account)
        wait = max(1, math.ceil(retry_after_s))
        headers = {"retry-after": str(wait), "retry-after-ms": str(math.ceil(retry_after_s * 1000))}
        if limit == "requests_per_minute":
            return RateLimited(
                f"Rate limit reached for key '{account}': {limits.requests_per_minute} "
                f"requests per minute. Retry in {wait} s.",
                headers=headers,
            )
        if limit == "state_store_unavailable":
            return StateUnavailable(
                f"Key '{account}' has a budget and the shared state store is unreachable, so "
                "its spend cannot be checked; retry shortly.",
                headers=headers,
            )
        if limit == "max_concurrent":
            return RateLimited(
                f"Concurrency limit reached for key '{account}': {limits.max_concurrent} "
                "requests in flight. Retry when one finishes.",
                code="concurrency_limit_exceeded",
                headers=headers,
            )
        period, amount = (
            ("daily", limits.usd_per_day)
            if limit == "usd_per_day"
            else ("monthly", limits.usd_per_month)
        )
        resets = "at 00:00 UTC" if period == "daily" else "on the 1st at 00:00 UTC"
        return QuotaExceeded(
            f"Key '{account}' has reached its {period} budget of {amount:g} USD (counting "
            f"requests in flight at what they may cost); it resets {resets}.",
            headers=headers,
        )

    async def usage(self, account: str, days: int) -> dict[str, Any]:
        now = time.time()
        period = Period.of(now)
        month_days = int(period.day[-2:])
        names = days_back(now, max(days, month_days))
        rows = (await self._store.ledger([account], names)).get(account, {})
        limits = self.limits(account)
        month = sum(r.get("micros", 0) for d, r in rows.items() if d.startswith(period.month))
        return {
            "object": "usage",
            "key_id": account,
            "limits": limits.model_dump(),
            "today": {"date": period.day, **day_row(rows.get(period.day, {}))},
            "month": {"month": period.month, "spend_usd": usd(month)},
            "days": [{"date": d, **day_row(rows[d])} for d in names[:days] if d in rows],
        }

    async def report(self, days: int) -> dict[str, Any]:
        names = days_back(time.time(), days)
        ledger: Ledger = await self._store.ledger(None, names)
        accounts = []
        totals: Counter[str] = Counter()
        for account, rows in sorted(ledger.items()):
            merged: Counter[str] = Counter()
            for row in rows.values():
                merged.update(row)
            totals.update(merged)
            accounts.append(
                {
                    "key_id": account,
                    **day_row(merged),
                    "days": [{"date": d, **day_row(rows[d])} for d in names if d in rows],
                }
            )
        return {
            "object": "spend",
            "days": days,
            **day_row(totals),
            "accounts": accounts,
            "unsettled_bills": self.unsettled,  # this replica's
        }


def day_row(row: Mapping[str, int]) -> dict[str, Any]:
    """A ledger row as the API shows it: USD, not micro-USD, and providers grouped."""
    providers: dict[str, dict[str, Any]] = {}
    for name, value in row.items():
        kind, _, provider = name.partition(":")
        if provider and kind in ("micros", "images", "spoiled", "abandoned"):
            entry = providers.setdefault(provider, {"spend_usd": 0.0, "images": 0})
            # spoiled / abandoned: jobs billed with no image to show for them
            entry["spend_usd" if kind == "micros" else kind] = (
                usd(value) if kind == "micros" else value
            )
    return {
        "spend_usd": usd(row.get("micros", 0)),
        "requests": row.get("requests", 0),
        "failed": row.get("failed", 0),
        "cache_hits": row.get("cache_hits", 0),
        "by_provider": providers,
    }


def sum_days(ledger: Ledger, day: str) -> Counter[str]:
    """Every account's row for one day, added up (the status page's spend today)."""
    total: Counter[str] = Counter()
    for rows in ledger.values():
        total.update(rows.get(day, {}))
    return total
