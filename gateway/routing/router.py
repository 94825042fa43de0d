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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

import orjson

from adapters.base import (
    ProviderError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderResult,
    UpscaleJob,
)
from gateway.config import RoutingConfig
from gateway.errors import GatewayError, ImageRejected
from gateway.metrics import BREAKER_VALUES, Metrics
from gateway.routing.candidates import Candidate, Plan, price_bounds, select, unavailable
from gateway.routing.entries import Attempt, ProviderEntry
from gateway.routing.outcomes import exhausted
from gateway.routing.preferences import Preferences
from gateway.routing.scoring import rank
from gateway.state.base import Outcome, Policy, ProviderRecord, StateStore

log = logging.getLogger("gateway.routing")
T = TypeVar("T")
Accept = Callable[[str, ProviderResult], Awaitable[T]]


@dataclass(slots=True)
class Served(Generic[T]):
    value: T
    provider: ProviderEntry
    attempts: list[Attempt] = field(default_factory=list)
    # (provider, USD) for the winner and every hedge loser still running: all are billed
    charges: list[tuple[str, float]] = field(default_factory=list)

    @property
    def cost_usd(self) -> float:
        return sum(price for _, price in self.charges)


class RoutingFailed(Exception):
    """Carries the gateway error to answer with and the attempts made, for the headers."""

    def __init__(self, error: GatewayError, attempts: list[Attempt]):
        super().__init__(error.message)
        self.error = error
        self.attempts = attempts


@dataclass(slots=True)
class _Running:
    candidate: Candidate
    started: float
    hedge: bool
    probe_token: str | None
    resume: bool = False  # follows the job the request's earlier claimant submitted


class Router:
    def __init__(
        self,
        providers: Sequence[ProviderEntry],
        config: RoutingConfig,
        store: StateStore,
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
        self._cache: tuple[float, dict[str, ProviderRecord]] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.providers)

    async def records(self) -> dict[str, ProviderRecord]:
        """The shared records, trusted for `cache_ttl_s` on the hot path."""
        now = time.time()
        if self._cache and now - self._cache[0] < self.config.cache_ttl_s:
            return self._cache[1]
        records = await self.store.snapshot(self.names, now, self.policy)
        self._cache = (now, records)
        for name, record in records.items():
            self.metrics.breaker.labels(name).set(BREAKER_VALUES[record.circuit(now)])
        return records

    def forget(self) -> None:
        self._cache = None  # the records changed here: read them afresh

    async def plan(
        self, prefs: Preferences, required: frozenset[str], request_id: str = ""
    ) -> Plan:
        now = time.time()
        records = await self.records()
        selection = select(self.providers, records, prefs, required, now)
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
        self, job: UpscaleJob, plan: Sequence[Candidate], accept: Accept[T], hedge: bool = False
    ) -> Served[T]:
        await self.store.count_request(time.time())
        queue = list(plan)
        follow = [job.resume[0]] if job.resume else []
        if follow:  # the provider that already has the job goes first, healthy or not:
            # following a job it has accepted costs nothing, and a new one is paid for again
            queue.sort(key=lambda c: c.entry.name != follow[0])
            held = next((e for e in self.providers if e.name == follow[0]), None)
            if held is not None and (not queue or queue[0].entry.name != follow[0]):
                queue.insert(0, Candidate(held, ProviderRecord(held.name)))
        active: dict[asyncio.Task[T], _Running] = {}
        attempts: list[Attempt] = []
        errors: list[ProviderError] = []
        hedged = False
        try:
            while True:
                if not active:
                    if not await self._start(queue, active, job, accept, False, follow):
                        break
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
                        await self._start(queue, active, job, accept, True, follow)
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
    ) -> bool:
        """Start the next candidate that may run now (a half-open one only as the probe)."""
        while queue and time.monotonic() < job.deadline:
            candidate = queue.pop(0)
            token = None
            if candidate.probe:
                token = secrets.token_hex(8)
                if not await self.store.try_probe(
                    candidate.entry.name, token, candidate.entry.attempt_timeout_s
                ):
                    continue  # another request, maybe on another replica, is probing
            # The earlier claimant's job is followed once; a failover after it submits anew.
            resume = bool(follow) and follow[0] == candidate.entry.name
            if resume:
                follow.clear()
            running = _Running(candidate, time.monotonic(), hedge, token, resume)
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
        attempt_job = replace(job, deadline=deadline, resume=job.resume if running.resume else None)
        try:
            result = await entry.adapter.upscale(attempt_job)
            provider_s = time.monotonic() - running.started
            value = await accept(entry.name, result)
        except ProviderError as exc:
            await self._feed(entry.name, exc, time.monotonic() - running.started, job)
            raise
        finally:
            if running.probe_token:
                await self.store.release_probe(entry.name, running.probe_token)
        await self.store.record(entry.name, Outcome(True, provider_s), time.time(), self.policy)
        self.forget()
        self.metrics.attempts.labels(entry.name, "ok").inc()
        self.metrics.latency.labels(entry.name).observe(provider_s)
        self._log(job, entry.name, "ok", provider_s, "", running)
        return value

    async def _feed(
        self, provider: str, exc: ProviderError, seconds: float, job: UpscaleJob
    ) -> None:
        """Provider faults feed the breaker; the caller's own mistakes and throttling do not
        (a 429 only cools the provider down for as long as it asked)."""
        if isinstance(exc, ProviderRateLimited):
            await self.store.set_cooldown(provider, time.time() + (exc.retry_after or 1.0))
        elif exc.retryable:
            await self.store.record(
                provider, Outcome(False, None, str(exc)), time.time(), self.policy
            )
        self.forget()
        self.metrics.attempts.labels(provider, type(exc).__name__).inc()
        self._log(job, provider, type(exc).__name__, seconds, str(exc), None)

    def _served(
        self,
        value: T,
        winner: _Running,
        attempts: list[Attempt],
        losers: dict[asyncio.Task[T], _Running],
    ) -> Served[T]:
        entry = winner.candidate.entry
        charges = [
            (r.candidate.entry.name, r.candidate.entry.price_usd)
            for r in (winner, *losers.values())
        ]
        for name, price in charges:
            self.metrics.spend.labels(name).inc(price)
        if winner.hedge:
            self.metrics.hedges.labels("won").inc()
        return Served(value, entry, attempts, charges)

    async def _cancel_losers(
        self, active: dict[asyncio.Task[T], _Running], attempts: list[Attempt]
    ) -> None:
        """Cancel what is still running (a hedge's loser); its adapter cancels the provider job."""
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
