"""In-process state store: the embedded default for one replica, the fallback view when
Redis is away, and the fake in unit tests. One class per concern (base.py), and
`MemoryStore` made of the four. Operations are atomic because they never await."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

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


class _Window:
    __slots__ = ("fail", "histogram", "ok")

    def __init__(self) -> None:
        self.ok = 0
        self.fail = 0
        self.histogram = [0] * len(LATENCY_BOUNDS)


@dataclass(slots=True)
class _Claim:
    fingerprint: str
    lease_until: float
    expires: float
    owner: str = ""  # the run that holds it: only it may renew, note, finish or release
    response: str = ""  # set when done
    journal: dict[str, str] = field(default_factory=dict)


class MemoryHealth:
    """Provider records, windows, breaker, probe lock and the hedge budget."""

    def __init__(self) -> None:
        self._records: dict[str, ProviderRecord] = {}
        self._windows: dict[str, dict[int, _Window]] = defaultdict(dict)
        self._probes: dict[str, tuple[str, float]] = {}
        self._minutes: dict[int, list[int]] = {}  # minute -> [requests, hedges]

    def _record(self, provider: str) -> ProviderRecord:
        return self._records.get(provider) or ProviderRecord(provider)

    async def record(
        self, provider: str, outcome: Outcome, now: float, policy: Policy
    ) -> ProviderRecord:
        rec = self._record(provider)
        windows = self._windows[provider]
        index = int(now // policy.bucket_s)
        window = windows.setdefault(index, _Window())
        for old in [i for i in windows if i < index - policy.window_s // policy.bucket_s]:
            del windows[old]
        if outcome.ok:
            window.ok += 1
            if outcome.latency_s is not None:
                window.histogram[latency_bucket(outcome.latency_s)] += 1
                ewma = (
                    outcome.latency_s
                    if rec.ewma_s is None
                    else (
                        policy.ewma_alpha * outcome.latency_s + (1 - policy.ewma_alpha) * rec.ewma_s
                    )
                )
                rec = replace(rec, ewma_s=ewma)
        else:
            window.fail += 1
            rec = replace(rec, last_error=outcome.error[:300])
        # Only an attempt started since the last transition moves the breaker, and while it
        # is open only the half-open probe (one that started half-open: a probe taken on a
        # replica's stale view, just after a failed probe re-opened it, is not): the rest
        # were in flight when it tripped (or closed) and count in the window only.
        started = now if outcome.started_at is None else outcome.started_at
        opened = rec.state == "open"
        probe = outcome.probe and started >= rec.open_until
        if started >= rec.changed_at and (probe or not opened):
            if outcome.ok:
                rec = replace(
                    rec,
                    state="closed",
                    consecutive_failures=0,
                    opened_count=0,
                    open_until=0.0,
                    recovered_at=now if opened else rec.recovered_at,
                    changed_at=now if opened else rec.changed_at,
                )
            else:
                failures = rec.consecutive_failures + 1
                rec = replace(rec, consecutive_failures=failures)
                # A failed probe re-opens with a longer backoff.
                if opened or (
                    failures >= policy.failure_threshold
                    and self._failure_share(provider, now, policy) >= policy.trip_error_rate
                ):
                    count = rec.opened_count + 1
                    rec = replace(
                        rec,
                        state="open",
                        opened_count=count,
                        open_until=now + policy.backoff(count),
                        changed_at=now,
                    )
        self._records[provider] = rec
        return await self._with_window(rec, now, policy)

    def _failure_share(self, provider: str, now: float, policy: Policy) -> float:
        windows = [self._windows[provider].get(i) for i in policy.buckets(now)]
        ok = sum(w.ok for w in windows if w)
        fail = sum(w.fail for w in windows if w)
        return fail / (ok + fail) if ok + fail else 0.0

    async def _with_window(self, rec: ProviderRecord, now: float, policy: Policy) -> ProviderRecord:
        windows = self._windows.get(rec.provider, {})
        histogram = [0] * len(LATENCY_BOUNDS)
        ok = fail = 0
        for index in policy.buckets(now):
            window = windows.get(index)
            if window:
                ok, fail = ok + window.ok, fail + window.fail
                histogram = [a + b for a, b in zip(histogram, window.histogram, strict=True)]
        return replace(
            rec,
            successes=ok,
            failures=fail,
            p50_s=percentile(histogram, 0.5),
            p95_s=percentile(histogram, 0.95),
        )

    async def snapshot(
        self, providers: Sequence[str], now: float, policy: Policy
    ) -> dict[str, ProviderRecord]:
        return {p: await self._with_window(self._record(p), now, policy) for p in providers}

    async def try_probe(self, provider: str, token: str, ttl_s: float) -> bool:
        held = self._probes.get(provider)
        if held and held[1] > time.monotonic():
            return False
        self._probes[provider] = (token, time.monotonic() + ttl_s)
        return True

    async def release_probe(self, provider: str, token: str) -> None:
        if self._probes.get(provider, ("",))[0] == token:
            del self._probes[provider]

    async def set_cooldown(self, provider: str, until: float) -> None:
        rec = self._record(provider)
        self._records[provider] = replace(rec, cooldown_until=max(rec.cooldown_until, until))

    async def set_drained(self, provider: str, drained: bool) -> None:
        self._records[provider] = replace(self._record(provider), drained=drained)

    async def set_price(self, provider: str, price_usd: float | None) -> None:
        self._records[provider] = replace(self._record(provider), price_usd=price_usd)

    async def reset_breaker(self, provider: str, now: float | None = None) -> None:
        self._records[provider] = replace(
            self._record(provider),
            state="closed",
            consecutive_failures=0,
            opened_count=0,
            open_until=0.0,
            cooldown_until=0.0,
            changed_at=time.time() if now is None else now,
        )
        self._probes.pop(provider, None)
        self._windows.pop(provider, None)  # old failures must not trip it again at once

    def _minute(self, now: float) -> list[int]:
        minute = int(now // 60)
        for old in [m for m in self._minutes if m < minute - 1]:
            del self._minutes[old]
        return self._minutes.setdefault(minute, [0, 0])

    async def count_request(self, now: float) -> None:
        self._minute(now)[0] += 1

    async def take_hedge(self, now: float, share: float, minimum: int) -> bool:
        counts = self._minute(now)
        if counts[1] >= int(share * counts[0]) + minimum:
            return False
        counts[1] += 1
        return True


class MemoryClaims:
    """Atomic claims: idempotency keys and the cache's names."""

    def __init__(self) -> None:
        self._claims: dict[str, _Claim] = {}

    def _claim(self, key: str, now: float) -> _Claim | None:
        claim = self._claims.get(key)
        if claim is not None and claim.expires <= now:
            del self._claims[key]
            return None
        return claim

    async def idem_begin(
        self, key: str, fingerprint: str, lease_s: float, owner: str = ""
    ) -> IdemClaim:
        now = time.time()
        claim = self._claim(key, now)
        if claim is None:
            if len(self._claims) > 100_000:  # one replica's memory: drop what has expired
                for stale in [k for k, c in self._claims.items() if c.expires <= now]:
                    del self._claims[stale]
            self._claims[key] = _Claim(
                fingerprint, now + lease_s, now + lease_s + CLAIM_KEEP_S, owner
            )
            return IdemClaim("new")
        if claim.fingerprint != fingerprint:
            return IdemClaim("conflict")
        if claim.response:
            return IdemClaim("done", claim.response)
        if claim.lease_until > now:
            return IdemClaim("pending")
        claim.lease_until, claim.expires = now + lease_s, now + lease_s + CLAIM_KEEP_S
        claim.owner = owner
        return IdemClaim("takeover", journal={f"job:{k}": v for k, v in claim.journal.items()})

    def _owned(self, key: str, fingerprint: str, owner: str) -> _Claim | None:
        claim = self._claims.get(key)
        if (
            claim is None
            or claim.fingerprint != fingerprint
            or claim.response
            or claim.owner != owner
        ):
            return None
        return claim

    async def idem_renew(
        self,
        key: str,
        fingerprint: str,
        lease_s: float,
        owner: str = "",
        keep_s: float = CLAIM_KEEP_S,
    ) -> bool:
        claim = self._owned(key, fingerprint, owner)
        now = time.time()
        if claim is not None:  # lapsed but not taken over: still this owner's
            claim.lease_until, claim.expires = now + lease_s, now + lease_s + keep_s
        return claim is not None

    async def idem_note(
        self, key: str, fingerprint: str, name: str, value: str, owner: str = ""
    ) -> bool:
        claim = self._owned(key, fingerprint, owner)
        if claim is not None:
            claim.journal[name] = value
        return claim is not None

    async def idem_finish(
        self, key: str, fingerprint: str, response: str, ttl_s: float, owner: str = ""
    ) -> bool:
        claim = self._owned(key, fingerprint, owner)
        if claim is not None:
            claim.response, claim.expires = response, time.time() + ttl_s
        return claim is not None

    async def idem_release(self, key: str, fingerprint: str, owner: str = "") -> None:
        if self._owned(key, fingerprint, owner) is not None:
            del self._claims[key]

    async def idem_drop(self, key: str, fingerprint: str, response: str) -> bool:
        claim = self._claims.get(key)
        if claim is None or claim.fingerprint != fingerprint or not claim.response:
            return False
        if claim.response != response:
            return False
        del self._claims[key]
        return True


class MemoryLedger:
    """Budgets and rates, the holds of requests in flight, the spend ledger."""

    def __init__(self) -> None:
        # account -> ticket -> (held micros, lease end); account -> emission time (GCRA)
        self._inflight: dict[str, dict[str, tuple[int, float]]] = defaultdict(dict)
        self._settled: dict[str, dict[str, float]] = defaultdict(dict)  # ticket -> until
        self._rate: dict[str, float] = {}
        self._days: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
        self._months: dict[str, Counter[str]] = defaultdict(Counter)
        self._billed: dict[str, dict[str, float]] = defaultdict(dict)  # account -> job -> until

    async def precheck(self, account: str, quota: Quota, now: float) -> Admission:
        inflight = self._inflight.get(account, {})
        live = sum(end > now for _, end in inflight.values())
        if quota.max_concurrent > 0 and live >= quota.max_concurrent:
            return Admission("max_concurrent", 1.0)
        if quota.requests_per_minute > 0:
            emission = max(self._rate.get(account, 0.0), now) + 60.0 / quota.requests_per_minute
            if emission - now > 60.0:
                return Admission("requests_per_minute", emission - now - 60.0)
        return Admission()

    async def admit(
        self, account: str, ticket: str, hold: Hold, quota: Quota, now: float, lease_s: float
    ) -> Admission:
        inflight = self._inflight[account]
        for stale in [t for t, (_, end) in inflight.items() if end <= now]:
            del inflight[stale]
        if quota.max_concurrent > 0 and len(inflight) >= quota.max_concurrent:
            return Admission("max_concurrent", 1.0)
        emission = None
        if quota.requests_per_minute > 0:
            # GCRA: a burst of up to a minute's allowance, then one every 60/rpm seconds.
            emission = max(self._rate.get(account, 0.0), now) + 60.0 / quota.requests_per_minute
            if emission - now > 60.0:
                return Admission("requests_per_minute", emission - now - 60.0)
        held = sum(amount for amount, _ in inflight.values())
        period = Period.of(now)
        day = self._days[account][period.day]["micros"]
        month = self._months[f"{account}\0{period.month}"]["micros"]

        def refused(amount: int) -> Admission | None:
            if quota.micros_per_day >= 0 and day + held + amount > quota.micros_per_day:
                return Admission("usd_per_day", period.day_left_s)
            if quota.micros_per_month >= 0 and month + held + amount > quota.micros_per_month:
                return Admission("usd_per_month", period.month_left_s)
            return None

        amount = hold.worst
        if refused(amount) is not None:
            amount = hold.least
            refusal = refused(amount)
            if refusal is not None:
                return refusal
        if emission is not None:
            self._rate[account] = emission
        inflight[ticket] = (amount, now + lease_s)
        return Admission(held=amount)

    async def settle(
        self,
        account: str,
        ticket: str,
        micros: int,
        counts: Mapping[str, int],
        now: float,
        jobs: Sequence[JobCharge] = (),
    ) -> list[bool]:
        if self._settled[account].get(ticket, 0.0) > now:
            return [False] * len(jobs)  # a retry of a settle that landed counts once
        self._inflight[account].pop(ticket, None)
        period = Period.of(now)
        day = self._days[account][period.day]
        day.update(counts)
        fresh = self._bill(account, [charge.job for charge in jobs], now)
        for charge, new in zip(jobs, fresh, strict=True):
            if new:
                micros += charge.micros
                day.update(dict(charge.counts))
        day["micros"] += micros
        self._months[f"{account}\0{period.month}"]["micros"] += micros
        self._settled[account][ticket] = now + 2 * 86400.0
        return fresh

    async def extend(
        self, account: str, ticket: str, micros: int, quota: Quota, now: float, lease_s: float
    ) -> bool:
        if self._settled[account].get(ticket, 0.0) > now:
            return True
        inflight = self._inflight[account]
        live = {t: amount for t, (amount, end) in inflight.items() if end > now}
        mine = live.pop(ticket, -1)
        if micros > mine:
            period = Period.of(now)
            others = sum(live.values())
            day = self._days[account][period.day]["micros"]
            month = self._months[f"{account}\0{period.month}"]["micros"]
            if quota.micros_per_day >= 0 and day + others + micros > quota.micros_per_day:
                return False
            if quota.micros_per_month >= 0 and month + others + micros > quota.micros_per_month:
                return False
        inflight[ticket] = (max(micros, mine), now + lease_s)
        return True

    def _bill(self, account: str, jobs: Sequence[str], now: float) -> list[bool]:
        billed = self._billed[account]
        if len(billed) > 100_000:  # one replica's memory: forget what has expired
            for stale in [j for j, until in billed.items() if until <= now]:
                del billed[stale]
        fresh = []
        for job in jobs:
            new = billed.get(job, 0.0) <= now
            if new:
                billed[job] = now + BILLED_JOB_KEEP_S
            fresh.append(new)
        return fresh

    def unconfirmed(self) -> int:
        return 0  # every settle is in the ledger once it returns

    async def ledger(self, accounts: Sequence[str] | None, days: Sequence[str]) -> Ledger:
        names = self._days.keys() if accounts is None else accounts
        return {
            a: {d: dict(self._days[a][d]) for d in days if self._days.get(a, {}).get(d)}
            for a in names
        }


class MemoryEvents:
    """The status page's per-minute event counters (the last two hours)."""

    def __init__(self) -> None:
        self._events: dict[int, Counter[str]] = {}

    async def count_events(self, now: float, events: Mapping[str, int]) -> None:
        minute = int(now // 60)
        for old in [m for m in self._events if m < minute - 120]:
            del self._events[old]
        self._events.setdefault(minute, Counter()).update(events)

    async def recent_events(self, now: float, minutes: int) -> dict[str, int]:
        minute = int(now // 60)
        total: Counter[str] = Counter()
        for m in range(minute - minutes + 1, minute + 1):
            total.update(self._events.get(m, {}))
        return dict(total)


class MemoryStore(ComposedStore):
    kind = "memory"

    def __init__(self) -> None:
        super().__init__(MemoryHealth(), MemoryClaims(), MemoryLedger(), MemoryEvents())

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None
