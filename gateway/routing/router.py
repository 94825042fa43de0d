"""Routing: plan the candidates for a request from shared state, then run them with
failover (and hedging, when asked) inside one request deadline, feeding every outcome back
into the shared records.

Routing knows providers only as `ProviderEntry` (name, adapter, price, flags); it never
imports an adapter module. The caller's `accept(provider, result)` step turns a provider
result into what it needs and may raise ProviderBadResponse for an unusable one, which
counts as that provider's fault.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Generic, Protocol, TypeVar

import orjson

from adapters.base import (
    ProviderError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderResult,
    ProviderTimeout,
    UpscaleJob,
)
from gateway.config import RoutingConfig
from gateway.errors import GatewayError, IdempotencyInProgress, ImageRejected
from gateway.metrics import BREAKER_VALUES, Metrics
from gateway.routing.candidates import (
    Candidate,
    Plan,
    price_bounds,
    select,
    unavailable,
)
from gateway.routing.entries import Attempt, ProviderEntry
from gateway.routing.outcomes import exhausted
from gateway.routing.preferences import Preferences
from gateway.routing.scoring import rank
from gateway.routing.spend import ABANDONED, SERVED, SPOILED, AttemptBilling, Spend
from gateway.state.base import EventStore, HealthStore, Outcome, Policy, ProviderRecord

log = logging.getLogger("gateway.routing")
HALF_OPEN_TTL_S = 0.1
T = TypeVar("T")
Accept = Callable[[str, ProviderResult], Awaitable[T]]


class RoutingStore(HealthStore, EventStore, Protocol):
    """What routing uses of the state: provider health, and the failover and hedge counts
    for the status page."""


@dataclass(slots=True)
class Served(Generic[T]):
    value: T
    provider: ProviderEntry
    attempts: list[Attempt] = field(default_factory=list)


class RoutingFailed(Exception):
    """Carries the gateway error to answer with and the attempts made, for the headers."""

    def __init__(self, error: GatewayError, attempts: list[Attempt]):
        super().__init__(error.message)
        self.error = error
        self.attempts = attempts


@dataclass(slots=True)
class _Running:
    candidate: Candidate
    started: float  # monotonic, for durations
    hedge: bool
    probe_token: str | None
    billing: AttemptBilling
    resume: bool = False  # follows the job the request's earlier claimant submitted
    # Wall clock, as the shared records compare it with a breaker's last transition: an
    # attempt started before a trip or a close tells nothing about the state after it.
    started_at: float = field(default_factory=time.time)


class Router:
    def __init__(
        self,
        providers: Sequence[ProviderEntry],
        config: RoutingConfig,
        store: RoutingStore,
        metrics: Metrics,
        rng: random.Random | None = None,
    ):
        self.providers = tuple(providers)
        self.config = config
        self.store = store
        self.metrics = metrics
        self.policy = Policy(
            failure_threshold=config.breaker.failure_threshold,
            trip_error_rate=config.breaker.min_error_rate,
            open_base_s=config.breaker.open_base_s,
            open_max_s=config.breaker.open_max_s,
            bucket_s=config.bucket_s,
            window_s=config.window_s,
            ewma_alpha=config.ewma_alpha,
        )
        self._rng = rng or random.Random()
        self._cache: tuple[float, dict[str, ProviderRecord]] | None = None  # (monotonic, view)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.providers)

    async def records(self) -> dict[str, ProviderRecord]:
        """The shared records, trusted for `cache_ttl_s` on the hot path; a view in which a
        provider is half-open only briefly: another replica's probe may close it any moment,
        and until this replica sees that, it keeps the recovered provider out."""
        if self._cache:
            seen, cached = self._cache
            ttl = self.config.cache_ttl_s
            if any(r.circuit(time.time()) == "half_open" for r in cached.values()):
                ttl = min(ttl, HALF_OPEN_TTL_S)
            if time.monotonic() - seen < ttl:
                return cached
        now = time.time()
        records = await self.store.snapshot(self.names, now, self.policy)
        self._cache = (time.monotonic(), records)
        for name, record in records.items():
            self.metrics.breaker.labels(name).set(BREAKER_VALUES[record.circuit(now)])
        return records

    def forget(self) -> None:
        self._cache = None  # the records changed here: read them afresh

    def _learn(self, record: ProviderRecord) -> None:
        """A record the store just returned is the freshest view of its provider: it
        replaces the cached one, without a round trip or dropping the others."""
        if self._cache is not None:
            self._cache = (self._cache[0], {**self._cache[1], record.provider: record})
            state = record.circuit(time.time())
            self.metrics.breaker.labels(record.provider).set(BREAKER_VALUES[state])

    async def plan(
        self,
        prefs: Preferences,
        required: frozenset[str],
        request_id: str = "",
        unfit: Mapping[str, str] | None = None,
    ) -> Plan:
        """`unfit`: providers that cannot take the request's input, and why."""
        now = time.time()
        records = await self.records()
        selection = select(self.providers, records, prefs, required, now, unfit)
        strategy = prefs.sort or self.config.strategy
        if not selection.candidates:
            self._log_plan(request_id, strategy, [], selection.excluded)
            raise unavailable(selection, required, now, records)
        ranked = rank(
            selection.candidates,
            strategy,
            self.config.weights,
            prefs.order,
            self._rng,
            self.config.explore_share,
            now,
            self.config.window_s,
        )
        ranked = ranked if prefs.allow_fallbacks else ranked[:1]
        self._log_plan(request_id, strategy, ranked, selection.excluded)
        return Plan(ranked, selection.excluded)

    @staticmethod
    def _log_plan(
        request_id: str, strategy: str, plan: Sequence[Candidate], excluded: dict[str, str]
    ) -> None:
        log.info(
            orjson.dumps(
                {
                    "event": "route",
                    "request_id": request_id,
                    "strategy": strategy,
                    "plan": [c.entry.name + ("(probe)" if c.probe else "") for c in plan],
                    "excluded": excluded,
                }
            ).decode()
        )

    def admitted(self, prefs: Preferences) -> list[str]:
        """The providers a request's `only` and `ignore` admit (price, health and flags
        aside: those can change between now and the plan)."""
        return [
            e.name
            for e in self.providers
            if (prefs.only is None or e.name in prefs.only) and e.name not in prefs.ignore
        ]

    async def prices(self, prefs: Preferences) -> tuple[float, float]:
        """The worst and least one image may cost under these preferences."""
        records = await self.records()
        return price_bounds(self.providers, records, prefs, self.wants_hedge(prefs))

    def wants_hedge(self, prefs: Preferences) -> bool:
        return self.config.hedge.enabled if prefs.hedge is None else prefs.hedge

    def _hedge_delay(self, candidate: Candidate) -> float:
        hedge = self.config.hedge
        if hedge.delay == "p95":
            return max(
                hedge.min_delay_s, candidate.record.p95_s or candidate.entry.attempt_timeout_s
            )
        return float(hedge.delay)

    async def run(
        self,
        job: UpscaleJob,
        plan: Sequence[Candidate],
        accept: Accept[T],
        hedge: bool = False,
        spend: Spend | None = None,
    ) -> Served[T]:
        """Serve one image; every job a provider bills on the way lands in `spend`."""
        spend = spend if spend is not None else Spend()
        await self.store.count_request(time.time())
        queue = list(plan)
        # Providers that already have a job of this request go first, healthy or not, all at
        # once: following a job they accepted costs nothing, and a new one is paid again.
        follow = [name for name, _ in job.resume if any(e.name == name for e in self.providers)]
        if follow:
            queue = [c for c in queue if c.entry.name not in follow]
            for name in reversed(follow):
                held = next(e for e in self.providers if e.name == name)
                planned = next((c for c in plan if c.entry.name == name), None)
                queue.insert(0, planned or Candidate(held, ProviderRecord(held.name)))
        active: dict[asyncio.Task[T], _Running] = {}
        attempts: list[Attempt] = []
        errors: list[ProviderError] = []
        hedged = False
        try:
            while True:
                if not active:
                    if not await self._start(
                        queue, active, job, accept, False, follow, spend, attempts
                    ):
                        break
                    while follow and queue and queue[0].entry.name in follow:
                        await self._start(
                            queue, active, job, accept, False, follow, spend, attempts
                        )
                    if attempts:
                        self.metrics.failovers.labels(attempts[-1].provider).inc()
                        await self.store.count_events(time.time(), {"failovers": 1})
                timeout = None
                if hedge and not hedged and queue and len(active) == 1:
                    (primary,) = active.values()
                    elapsed = time.monotonic() - primary.started
                    timeout = max(0.0, self._hedge_delay(primary.candidate) - elapsed)
                done, _ = await asyncio.wait(
                    active, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    hedged = True
                    if await self.store.take_hedge(
                        time.time(),
                        self.config.hedge.budget_share,
                        self.config.hedge.budget_min_per_minute,
                    ):
                        await self._start(queue, active, job, accept, True, follow, spend, attempts)
                        self.metrics.hedges.labels("started").inc()
                        await self.store.count_events(time.time(), {"hedges": 1})
                    else:
                        self.metrics.hedges.labels("denied").inc()
                    continue
                for task in done:
                    running = active.pop(task)
                    name = running.candidate.entry.name
                    exc = task.exception()
                    seconds = time.monotonic() - running.started
                    if exc is None:
                        running.billing.fate = SERVED
                        attempts.append(
                            Attempt(
                                name,
                                "ok",
                                seconds,
                                hedge=running.hedge,
                                probe=running.probe_token is not None,
                            )
                        )
                        return self._served(task.result(), running, attempts, active)
                    # Billed before it failed: its output was spoiled; a charge that comes later
                    # is a job given up on (a deadline) that finished anyway.
                    running.billing.fate = SPOILED if running.billing.charged else ABANDONED
                    if not isinstance(exc, ProviderError):
                        raise exc
                    attempts.append(
                        Attempt(
                            name,
                            type(exc).__name__,
                            seconds,
                            str(exc),
                            hedge=running.hedge,
                            probe=running.probe_token is not None,
                        )
                    )
                    errors.append(exc)
                    if not exc.retryable:
                        raise RoutingFailed(self._rejected(exc), attempts) from exc
        finally:
            await self._cancel_losers(active, attempts)
        skipped = plan.excluded if isinstance(plan, Plan) else {}
        raise RoutingFailed(exhausted(errors, job, self.providers, skipped), attempts)

    async def _start(
        self,
        queue: list[Candidate],
        active: dict[asyncio.Task[T], _Running],
        job: UpscaleJob,
        accept: Accept[T],
        hedge: bool,
        follow: list[str],
        spend: Spend,
        attempts: list[Attempt],
    ) -> bool:
        """Start the next candidate that may run now (a half-open one only as the probe)."""
        while queue and time.monotonic() < job.deadline:
            candidate = queue.pop(0)
            following = candidate.entry.name in follow
            if not following and job.may_submit is not None and not job.may_submit():
                raise RoutingFailed(
                    IdempotencyInProgress(
                        "A retry of this request took its Idempotency-Key over and serves it; "
                        "retry to get its result.",
                        param="Idempotency-Key",
                    ),
                    attempts,
                )
            # What this request may bill, this attempt included, must fit its budget hold (a
            # failover after a spoiled job bills both providers): else it stops here.
            try:
                await spend.allow(candidate.entry.price_usd)
            except GatewayError as refused:
                raise RoutingFailed(refused, attempts) from None
            token = None
            if candidate.probe:
                token = secrets.token_hex(8)
                # Held as long as the probe may run: the last candidate has all that is left.
                runs_s = job.deadline - time.monotonic()
                if queue:
                    runs_s = min(runs_s, candidate.entry.attempt_timeout_s)
                if not await self.store.try_probe(candidate.entry.name, token, runs_s):
                    continue  # another request, maybe on another replica, is probing
            # The earlier claimant's job is followed once; a failover after it submits anew.
            resume = following
            if resume:
                follow.remove(candidate.entry.name)
            billing = spend.attempt(candidate.entry.price_usd)
            running = _Running(candidate, time.monotonic(), hedge, token, billing, resume)
            task = asyncio.create_task(self._attempt(running, job, accept, last=not queue))
            active[task] = running
            return True
        return False

    async def _attempt(
        self, running: _Running, job: UpscaleJob, accept: Accept[T], last: bool
    ) -> T:
        entry = running.candidate.entry
        # Leave the rest of the deadline to the next candidates unless this is the last.
        deadline = (
            job.deadline if last else min(job.deadline, running.started + entry.attempt_timeout_s)
        )
        image, mime = job.inputs.get(entry.name, (job.image, job.mime))
        attempt_job = replace(
            job,
            image=image,
            mime=mime,
            deadline=deadline,
            resume=job.resume if running.resume else (),
            billing=running.billing,
        )
        try:
            try:
                # The attempt as a whole, not each socket read: a provider that trickles its
                # answer must not outlive the deadline (the adapter cancels its job).
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    result = await entry.adapter.upscale(attempt_job)
            except TimeoutError:
                budget = deadline - running.started
                raise ProviderTimeout(entry.name, f"no result within {budget:.1f} s") from None
            provider_s = time.monotonic() - running.started
            value = await accept(entry.name, result)
        except ProviderError as exc:
            await self._feed(entry.name, exc, time.monotonic() - running.started, job, running)
            raise
        finally:
            if running.probe_token:
                await self.store.release_probe(entry.name, running.probe_token)
        outcome = Outcome(
            True, provider_s, started_at=running.started_at, probe=running.probe_token is not None
        )
        self._learn(await self.store.record(entry.name, outcome, time.time(), self.policy))
        self.metrics.attempts.labels(entry.name, "ok").inc()
        self.metrics.latency.labels(entry.name).observe(provider_s)
        self._log(job, entry.name, "ok", provider_s, "", running)
        return value

    async def _feed(
        self, provider: str, exc: ProviderError, seconds: float, job: UpscaleJob, running: _Running
    ) -> None:
        """Provider faults feed the breaker; the caller's own mistakes and throttling do not
        (a 429 only cools the provider down for as long as it asked)."""
        if isinstance(exc, ProviderRateLimited):
            await self.store.set_cooldown(provider, time.time() + (exc.retry_after or 1.0))
            self.forget()
        elif exc.retryable:
            outcome = Outcome(
                False,
                None,
                str(exc),
                started_at=running.started_at,
                probe=running.probe_token is not None,
            )
            self._learn(await self.store.record(provider, outcome, time.time(), self.policy))
        self.metrics.attempts.labels(provider, type(exc).__name__).inc()
        self._log(job, provider, type(exc).__name__, seconds, str(exc), None)

    def _served(
        self,
        value: T,
        winner: _Running,
        attempts: list[Attempt],
        losers: dict[asyncio.Task[T], _Running],
    ) -> Served[T]:
        if winner.hedge:
            self.metrics.hedges.labels("won").inc()
        return Served(value, winner.candidate.entry, attempts)

    async def _cancel_losers(
        self, active: dict[asyncio.Task[T], _Running], attempts: list[Attempt]
    ) -> None:
        """Cancel what is still running (a hedge's loser); its adapter cancels the provider job."""
        for running in active.values():
            running.billing.fate = ABANDONED  # a job it had billed is paid for nothing
        for task in active:
            task.cancel()
        await asyncio.gather(*active, return_exceptions=True)
        for running in active.values():
            name = running.candidate.entry.name
            attempts.append(
                Attempt(name, "cancelled", time.monotonic() - running.started, hedge=running.hedge)
            )
            self.metrics.attempts.labels(name, "cancelled").inc()
            if running.hedge:
                self.metrics.hedges.labels("lost").inc()
        active.clear()

    @staticmethod
    def _rejected(exc: ProviderError) -> GatewayError:
        code = exc.code if isinstance(exc, ProviderRejected) else "invalid_image"
        return ImageRejected(
            f"The provider refused the image: {exc.message}", param="image", code=code
        )

    @staticmethod
    def _log(
        job: UpscaleJob,
        provider: str,
        outcome: str,
        seconds: float,
        detail: str,
        running: _Running | None,
    ) -> None:
        log.info(
            orjson.dumps(
                {
                    "event": "attempt",
                    "request_id": job.request_id,
                    "provider": provider,
                    "outcome": outcome,
                    "seconds": round(seconds, 3),
                    "detail": detail,
                    "hedge": bool(running and running.hedge),
                    "probe": bool(running and running.probe_token),
                }
            ).decode()
        )
