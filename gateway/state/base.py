"""The shared state, one protocol per concern, each with two implementations (in-process
and Redis) that pass the same contract tests (tests/integration/test_*_contract.py):
`HealthStore` (provider records, breaker, probe lock, hedge budget), `ClaimStore` (atomic
claims: idempotency keys and the cache's names), `LedgerStore` (budgets, holds, the spend
ledger) and `EventStore` (the status page's counters). `StateStore` is all four in one
store, as the app builds it; each consumer takes only the concern it uses.

Per provider: a record (circuit state, consecutive failures, backoff, latency EWMA, last
error, Retry-After cool-down, operator drain) and time-bucketed windows (successes, failures
and a latency histogram) from which p50/p95 are read. Every update that must be atomic across
replicas is one operation of the store: `record` (window + EWMA + breaker transition),
`try_probe` (one half-open probe at a time), `take_hedge` (the shared hedge budget).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

# Latency histogram upper bounds in seconds; the last bucket is open-ended.
LATENCY_BOUNDS: tuple[float, ...] = (
    0.025,
    0.05,
    0.1,
    0.2,
    0.35,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    45.0,
    60.0,
    90.0,
    120.0,
    math.inf,
)


def latency_bucket(seconds: float) -> int:
    for index, bound in enumerate(LATENCY_BOUNDS):
        if seconds <= bound:
            return index
    return len(LATENCY_BOUNDS) - 1


def percentile(histogram: Sequence[int], q: float) -> float | None:
    """The q-quantile of a bucketed histogram, interpolated inside its bucket."""
    total = sum(histogram)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(histogram):
        if count and seen + count >= rank:
            low = LATENCY_BOUNDS[index - 1] if index else 0.0
            high = LATENCY_BOUNDS[index]
            if math.isinf(high):
                return low
            return low + (high - low) * max(0.0, rank - seen) / count
        seen += count
    return LATENCY_BOUNDS[-2]


@dataclass(frozen=True, slots=True)
class Policy:
    """Breaker and window parameters (from config) the store applies atomically."""

    failure_threshold: int = 3
    trip_error_rate: float = 0.5  # and at least this share of the window failed
    open_base_s: float = 5.0
    open_max_s: float = 300.0
    bucket_s: float = 10.0
    window_s: float = 60.0
    ewma_alpha: float = 0.3

    def backoff(self, opened_count: int) -> float:
        return min(self.open_max_s, self.open_base_s * 2 ** max(0, opened_count - 1))

    def buckets(self, now: float) -> range:
        """Indices of the window's buckets, newest last."""
        newest = int(now // self.bucket_s)
        return range(newest - int(self.window_s // self.bucket_s) + 1, newest + 1)


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    provider: str
    state: str = "closed"  # closed | open (half-open is open past open_until)
    open_until: float = 0.0
    opened_count: int = 0
    consecutive_failures: int = 0
    ewma_s: float | None = None
    p50_s: float | None = None
    p95_s: float | None = None
    successes: int = 0
    failures: int = 0
    last_error: str = ""
    cooldown_until: float = 0.0
    drained: bool = False
    recovered_at: float = 0.0
    price_usd: float | None = None  # an operator's price, overriding the config's
    changed_at: float = 0.0  # the last breaker transition: trip, re-open, close, reset

    def circuit(self, now: float) -> str:
        if self.state == "open":
            return "open" if now < self.open_until else "half_open"
        return "closed"

    @property
    def error_rate(self) -> float:
        total = self.successes + self.failures
        return self.failures / total if total else 0.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """One finished attempt, as the store records it."""

    ok: bool
    latency_s: float | None = None
    error: str = ""
    # When the attempt started (time.time()); None: now. One started before the breaker's
    # last transition counts in the window but moves nothing.
    started_at: float | None = None
    probe: bool = False  # the half-open probe: the only attempt that moves an open breaker


# How long a billed provider job is remembered, so that it is charged once.
BILLED_JOB_KEEP_S = 2 * 86400.0

# How long a claim whose claimant stopped renewing stays, for the client's retry to take it
# over with its journal of provider jobs (after that, the retry starts afresh).
CLAIM_KEEP_S = 600.0


@dataclass(frozen=True, slots=True)
class JobCharge:
    """One provider job's charge in a settle: added to the ledger (`micros`, and `counts` to
    the day's counters) only if no settle charged the job before, within BILLED_JOB_KEEP_S.
    A claimant and the retry that took its claim over may both follow one job."""

    job: str  # "<provider>:<job id>"
    micros: int
    counts: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class IdemClaim:
    """What an idempotency key holds when a request claims it: `new` (the claimant runs
    the request), `pending` (another request is running it), `done` (with the stored
    response), `conflict` (the key was used for a different request), or `takeover` (the
    same request's claimant stopped renewing its lease: this one runs it, resuming the
    provider jobs in `journal`, field -> JSON, that the claimant noted)."""

    state: str
    response: str = ""
    journal: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Quota:
    """A client key's limits as the store applies them: money in micro-USD (integers add
    exactly, across replicas and in Lua), -1 or 0 for none."""

    micros_per_day: int = -1
    micros_per_month: int = -1
    requests_per_minute: int = 0
    max_concurrent: int = 0
    shared_only: bool = True  # budgets: refuse rather than admit on one replica's view

    @property
    def has_budget(self) -> bool:
        return self.micros_per_day >= 0 or self.micros_per_month >= 0


@dataclass(frozen=True, slots=True)
class Hold:
    """What an admitted request may cost, in micro-USD: `worst` under its own preferences,
    and `least` on the cheapest plan (the cheapest provider, no hedge), which is held
    instead when only that still fits the budget."""

    worst: int
    least: int


@dataclass(frozen=True, slots=True)
class Admission:
    """`limit` is empty when admitted, else the limit that refused (with when to retry);
    `held` is the amount the lease holds."""

    limit: str = ""
    retry_after_s: float = 0.0
    held: int = 0


@dataclass(frozen=True, slots=True)
class Period:
    """The ledger's UTC day and month of an instant, and the seconds left in each."""

    day: str
    month: str
    day_left_s: float
    month_left_s: float

    @classmethod
    def of(cls, now: float) -> Period:
        moment = datetime.fromtimestamp(now, UTC)
        day_start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        next_day = day_start + timedelta(days=1)
        month_start = day_start.replace(day=1)
        next_month = (month_start + timedelta(days=32)).replace(day=1)
        return cls(
            day=day_start.strftime("%Y-%m-%d"),
            month=month_start.strftime("%Y-%m"),
            day_left_s=(next_day - moment).total_seconds(),
            month_left_s=(next_month - moment).total_seconds(),
        )


def days_back(now: float, count: int) -> list[str]:
    today = datetime.fromtimestamp(now, UTC).date()
    return [(today - timedelta(days=n)).isoformat() for n in range(count)]


# account -> day -> field -> integer ("micros" = spend in micro-USD, "micros:<provider>",
# "images:<provider>", "requests", "cache_hits", "failed", ...)
Ledger = dict[str, dict[str, dict[str, int]]]


class HealthStore(Protocol):
    """Provider health: the records, the breaker, the half-open probe lock and the shared
    hedge budget (requests and hedges per minute)."""

    async def record(
        self, provider: str, outcome: Outcome, now: float, policy: Policy
    ) -> ProviderRecord: ...

    async def snapshot(
        self, providers: Sequence[str], now: float, policy: Policy
    ) -> dict[str, ProviderRecord]: ...

    async def try_probe(self, provider: str, token: str, ttl_s: float) -> bool: ...

    async def release_probe(self, provider: str, token: str) -> None: ...

    async def set_cooldown(self, provider: str, until: float) -> None: ...

    async def set_drained(self, provider: str, drained: bool) -> None: ...

    async def set_price(self, provider: str, price_usd: float | None) -> None: ...

    async def reset_breaker(self, provider: str) -> None: ...

    async def take_hedge(self, now: float, share: float, minimum: int) -> bool: ...

    async def count_request(self, now: float) -> None: ...


class ClaimStore(Protocol):
    """Atomic claims on names: idempotency keys, and the cache's names (under a prefix)."""

    # `owner`: a token of the run that claims the key; renew, note, finish and release act
    # only for the claim's current owner and say whether they did. Leases run on the
    # store's own clock (Redis TIME), never on a replica's.
    async def idem_begin(
        self, key: str, fingerprint: str, lease_s: float, owner: str = ""
    ) -> IdemClaim: ...

    async def idem_renew(
        self,
        key: str,
        fingerprint: str,
        lease_s: float,
        owner: str = "",
        keep_s: float = CLAIM_KEEP_S,
    ) -> bool:
        """Renew the owner's lease for `lease_s`; the claim, journal and all, stays `keep_s`
        past it for a retry to take over (a hand-over keeps it as long as a replay would)."""
        ...

    async def idem_note(
        self, key: str, fingerprint: str, name: str, value: str, owner: str = ""
    ) -> bool: ...

    async def idem_finish(
        self, key: str, fingerprint: str, response: str, ttl_s: float, owner: str = ""
    ) -> bool: ...

    async def idem_release(self, key: str, fingerprint: str, owner: str = "") -> None: ...

    async def idem_drop(self, key: str, fingerprint: str, response: str) -> bool:
        """Delete a done claim, only while it still holds `response` (what the caller read):
        never a pending claim, nor one finished again since. True if it was deleted."""
        ...


class LedgerStore(Protocol):
    """Client keys' budgets and rates, the holds of requests in flight, the spend ledger."""

    async def precheck(self, account: str, quota: Quota, now: float) -> Admission:
        """The limits a request can be refused by before its body is read (requests in
        flight and requests a minute), looked at without taking anything: `admit`, after
        the body, still decides."""
        ...

    async def admit(
        self, account: str, ticket: str, hold: Hold, quota: Quota, now: float, lease_s: float
    ) -> Admission: ...

    async def settle(
        self,
        account: str,
        ticket: str,
        micros: int,
        counts: Mapping[str, int],
        now: float,
        jobs: Sequence[JobCharge] = (),
    ) -> list[bool]:
        """End a request's hold and add its spend to the ledger, once per ticket: `micros`
        and `counts` as given, and each of `jobs` not charged before; True for each job
        charged here. One atomic step: a replica that dies mid-settle leaves its jobs either
        charged or free for the retry that follows them to charge (never marked billed
        and missing from the ledger)."""
        ...

    async def extend(
        self, account: str, ticket: str, micros: int, quota: Quota, now: float, lease_s: float
    ) -> bool:
        """Make an admitted request's hold `micros` (what it may now bill, failovers
        included) and renew its lease; False, changing nothing, if a larger hold would pass
        a budget. A settled ticket is left settled."""
        ...

    async def ledger(self, accounts: Sequence[str] | None, days: Sequence[str]) -> Ledger: ...

    def unconfirmed(self) -> int:
        """Settlements taken but not yet in the ledger `ledger` reads (a store that keeps
        them until the shared one answers again); 0 when the ledger is up to date."""
        ...


class EventStore(Protocol):
    """The status page's per-minute event counters (requests, failovers, hedges, ...)."""

    async def count_events(self, now: float, events: Mapping[str, int]) -> None: ...

    async def recent_events(self, now: float, minutes: int) -> dict[str, int]: ...


class StateStore(HealthStore, ClaimStore, LedgerStore, EventStore, Protocol):
    """All four concerns behind one store: what the app builds and passes around."""

    kind: str

    async def ping(self) -> bool: ...

    async def aclose(self) -> None: ...
