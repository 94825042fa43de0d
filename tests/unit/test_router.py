from __future__ import annotations

import asyncio
import time

import pytest

from adapters.base import (
    ProviderBadResponse,
    ProviderError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderResult,
    ProviderUnavailable,
    UpscaleJob,
)
from gateway.errors import DeadlineExceeded, ImageRejected, NoProviderAvailable, UpstreamBadResponse
from gateway.routing.router import ProviderEntry, Router, RoutingFailed

pytestmark = pytest.mark.anyio


class FakeAdapter:
    """Implements the Adapter protocol with a scripted outcome per call."""

    def __init__(self, name: str, outcomes: list[ProviderError | float | None]):
        self.name = name
        self.outcomes = outcomes
        self.calls: list[UpscaleJob] = []

    async def upscale(self, job: UpscaleJob) -> ProviderResult:
        self.calls.append(job)
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if isinstance(outcome, ProviderError):
            raise outcome
        if isinstance(outcome, float):
            await asyncio.sleep(outcome)
        return ProviderResult(
            image=b"img-" + self.name.encode(), content_type="image/png", provider_job_id="1"
        )

    async def aclose(self) -> None:
        return None


def entry(
    adapter: FakeAdapter,
    price: float,
    supports: frozenset[str] = frozenset(),
    attempt_timeout_s: float = 60.0,
) -> ProviderEntry:
    return ProviderEntry(adapter.name, adapter, price, supports, attempt_timeout_s)


def job(timeout: float = 5.0, **options: object) -> UpscaleJob:
    return UpscaleJob(b"png", 10, 10, time.monotonic() + timeout, "req_1", options)


async def accept(provider: str, result: ProviderResult) -> bytes:
    return result.image


async def test_cheapest_first_and_flags_restrict() -> None:
    fal, rep = FakeAdapter("fal", []), FakeAdapter("replicate", [])
    router = Router([entry(rep, 0.006), entry(fal, 0.004, frozenset({"enable_safety_checker"}))])
    assert [p.name for p in router.plan(frozenset())] == ["fal", "replicate"]
    assert [p.name for p in router.plan(frozenset({"enable_safety_checker"}))] == ["fal"]
    served = await router.run(job(), router.plan(frozenset()), accept)
    assert served.value == b"img-fal" and [a.header() for a in served.attempts] == ["fal=ok"]


async def test_retryable_fault_fails_over() -> None:
    fal = FakeAdapter("fal", [ProviderUnavailable("fal", "boom", upstream_status=500)])
    rep = FakeAdapter("replicate", [])
    router = Router([entry(fal, 0.004), entry(rep, 0.006)])
    served = await router.run(job(), router.plan(frozenset()), accept)
    assert served.provider.name == "replicate"
    assert [a.header() for a in served.attempts] == ["fal=ProviderUnavailable", "replicate=ok"]


async def test_unusable_output_fails_over() -> None:
    fal, rep = FakeAdapter("fal", []), FakeAdapter("replicate", [])
    router = Router([entry(fal, 0.004), entry(rep, 0.006)])

    async def picky(provider: str, result: ProviderResult) -> bytes:
        if provider == "fal":
            raise ProviderBadResponse(provider, "truncated")
        return result.image

    served = await router.run(job(), router.plan(frozenset()), picky)
    assert served.value == b"img-replicate"


async def test_callers_own_mistake_does_not_fail_over() -> None:
    fal = FakeAdapter("fal", [ProviderRejected("fal", "nsfw", code="content_policy_violation")])
    rep = FakeAdapter("replicate", [])
    router = Router([entry(fal, 0.004), entry(rep, 0.006)])
    with pytest.raises(RoutingFailed) as failed:
        await router.run(job(), router.plan(frozenset()), accept)
    assert isinstance(failed.value.error, ImageRejected)
    assert failed.value.error.code == "content_policy_violation" and not rep.calls


async def test_all_down_is_503_naming_each_reason() -> None:
    fal = FakeAdapter("fal", [ProviderUnavailable("fal", "runner down", upstream_status=503)])
    rep = FakeAdapter("replicate", [ProviderRateLimited("replicate", "slow down", retry_after=7)])
    router = Router([entry(fal, 0.004), entry(rep, 0.006)])
    with pytest.raises(RoutingFailed) as failed:
        await router.run(job(), router.plan(frozenset()), accept)
    error = failed.value.error
    assert isinstance(error, NoProviderAvailable) and error.status == 503
    assert "fal: runner down" in error.message and "replicate: slow down" in error.message


async def test_all_nonsense_is_502() -> None:
    fal = FakeAdapter("fal", [ProviderBadResponse("fal", "not json")])
    router = Router([entry(fal, 0.004)])
    with pytest.raises(RoutingFailed) as failed:
        await router.run(job(), router.plan(frozenset()), accept)
    assert isinstance(failed.value.error, UpstreamBadResponse)


async def test_no_candidate_says_why() -> None:
    router = Router([entry(FakeAdapter("replicate", []), 0.006)])
    with pytest.raises(RoutingFailed) as failed:
        await router.run(
            job(enable_safety_checker=True),
            router.plan(frozenset({"enable_safety_checker"})),
            accept,
        )
    assert "enable_safety_checker=true" in failed.value.error.message


async def test_attempt_budget_leaves_time_for_the_next_candidate() -> None:
    slow, rep = FakeAdapter("fal", []), FakeAdapter("replicate", [])
    router = Router([entry(slow, 0.004, attempt_timeout_s=0.5), entry(rep, 0.006)])
    the_job = job(timeout=30)
    await router.run(the_job, router.plan(frozenset()), accept)
    assert slow.calls[0].deadline <= time.monotonic() + 0.5


async def test_deadline_passed_is_504() -> None:
    fal = FakeAdapter("fal", [ProviderError("fal", "x")])
    router = Router([entry(fal, 0.004)])
    expired = UpscaleJob(b"png", 10, 10, time.monotonic() - 1, "req_1", {})
    with pytest.raises(RoutingFailed) as failed:
        await router.run(expired, router.plan(frozenset()), accept)
    assert isinstance(failed.value.error, DeadlineExceeded)
