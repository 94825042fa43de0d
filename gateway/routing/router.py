"""First version of routing: candidates in price order (or config order), failover on
retryable provider faults, all inside one request deadline.

Routing knows providers only as `ProviderEntry` (name, adapter, price, flags it supports);
it never imports an adapter module. The caller's `accept(provider, result)` step turns a provider
result into what it needs and may raise ProviderBadResponse for an unusable one, which counts
as that provider's fault and moves on to the next candidate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import orjson

from adapters.base import (
    Adapter,
    ProviderBadResponse,
    ProviderError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderResult,
    ProviderTimeout,
    UpscaleJob,
)
from gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    ImageRejected,
    NoProviderAvailable,
    UpstreamBadResponse,
)

log = logging.getLogger("gateway.routing")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ProviderEntry:
    name: str
    adapter: Adapter
    price_usd: float
    supports: frozenset[str]
    attempt_timeout_s: float = 60.0


@dataclass(slots=True)
class Attempt:
    provider: str
    outcome: str  # "ok", or the error class, e.g. "ProviderTimeout"
    seconds: float
    detail: str = ""

    def header(self) -> str:
        return f"{self.provider}={self.outcome}"


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


class Router:
    def __init__(self, providers: Sequence[ProviderEntry], strategy: str = "cheapest"):
        self.providers = tuple(providers)
        self.strategy = strategy

    def plan(self, required: frozenset[str]) -> list[ProviderEntry]:
        candidates = [p for p in self.providers if required <= p.supports]
        if self.strategy == "cheapest":
            candidates.sort(key=lambda p: p.price_usd)  # stable: config order breaks ties
        return candidates

    async def run(
        self,
        job: UpscaleJob,
        plan: Sequence[ProviderEntry],
        accept: Callable[[str, ProviderResult], Awaitable[T]],
    ) -> Served[T]:
        attempts: list[Attempt] = []
        errors: list[ProviderError] = []
        if not plan:
            raise RoutingFailed(NoProviderAvailable(self._no_candidate_message(job)), attempts)
        for index, entry in enumerate(plan):
            now = time.monotonic()
            if now >= job.deadline:
                break
            last = index == len(plan) - 1
            # Leave the rest of the deadline to the next candidates unless this is the last.
            deadline = job.deadline if last else min(job.deadline, now + entry.attempt_timeout_s)
            attempt_job = UpscaleJob(
                job.png, job.width, job.height, deadline, job.request_id, job.options
            )
            try:
                value = await accept(entry.name, await entry.adapter.upscale(attempt_job))
            except ProviderError as exc:
                attempts.append(
                    Attempt(entry.name, type(exc).__name__, time.monotonic() - now, str(exc))
                )
                errors.append(exc)
                self._log(job, entry, attempts[-1])
                if not exc.retryable:
                    raise RoutingFailed(self._rejected(exc), attempts) from exc
                continue
            attempts.append(Attempt(entry.name, "ok", time.monotonic() - now))
            self._log(job, entry, attempts[-1])
            return Served(value, entry, attempts)
        raise RoutingFailed(self._exhausted(errors, job, self._restricted_note(job)), attempts)

    def _no_candidate_message(self, job: UpscaleJob) -> str:
        flags = sorted(k for k, v in job.options.items() if v is True)
        if not self.providers:
            return "No provider is configured: set FAL_KEY or REPLICATE_API_TOKEN."
        return (
            "No configured provider supports what the request insists on "
            f"({', '.join(f'{f}=true' for f in flags) or 'its options'})."
        )

    @staticmethod
    def _rejected(exc: ProviderError) -> GatewayError:
        code = exc.code if isinstance(exc, ProviderRejected) else "invalid_image"
        return ImageRejected(
            f"The provider refused the image: {exc.message}", param="image", code=code
        )

    def _restricted_note(self, job: UpscaleJob) -> str:
        """Say so when the request's own flags narrowed the candidates, rather than leave the
        caller to think every provider was tried."""
        flags = [
            f
            for f, v in job.options.items()
            if v is True and any(f not in p.supports for p in self.providers)
        ]
        if not flags:
            return ""
        names = ", ".join(f"{f}=true" for f in flags)
        return f" Only providers that support {names} were eligible."

    @staticmethod
    def _exhausted(errors: list[ProviderError], job: UpscaleJob, note: str = "") -> GatewayError:
        reasons = ("; ".join(str(e) for e in errors) or "no attempt could start") + "." + note
        if time.monotonic() >= job.deadline and (
            not errors or isinstance(errors[-1], ProviderTimeout)
        ):
            return DeadlineExceeded(
                f"The request deadline passed before a provider answered: {reasons}"
            )
        if errors and all(isinstance(e, ProviderBadResponse) for e in errors):
            return UpstreamBadResponse(f"Every provider answered unusably: {reasons}")
        headers = {}
        waits = [
            e.retry_after for e in errors if isinstance(e, ProviderRateLimited) and e.retry_after
        ]
        if waits and len(waits) == len(errors):
            headers["retry-after"] = str(max(1, round(min(waits))))
        return NoProviderAvailable(
            f"No provider could serve the request: {reasons}", headers=headers
        )

    @staticmethod
    def _log(job: UpscaleJob, entry: ProviderEntry, attempt: Attempt) -> None:
        log.info(
            orjson.dumps(
                {
                    "event": "attempt",
                    "request_id": job.request_id,
                    "provider": entry.name,
                    "outcome": attempt.outcome,
                    "seconds": round(attempt.seconds, 3),
                    "detail": attempt.detail,
                }
            ).decode()
        )
