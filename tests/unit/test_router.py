from __future__ import annotations

import asyncio
import dataclasses
import random
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
from gateway.config import BreakerConfig, HedgeConfig, RoutingConfig
from gateway.errors import (
    DeadlineExceeded,
    ImageRejected,
    InvalidRequest,
    NoProviderAvailable,
    UpstreamBadResponse,
)
from gateway.metrics import Metrics
from gateway.routing.entries import ProviderEntry
from gateway.routing.preferences import Preferences
from gateway.routing.router import Router, RoutingFailed
from gateway.routing.spend import Spend
from gateway.state.memory import MemoryStore

pytestmark = pytest.mark.anyio
SAFETY = frozenset({"enable_safety_checker"})


class FakeAdapter:
    """Implements the Adapter protocol with a scripted outcome per call."""

    def __init__(self, name: str, outcomes: list[ProviderError | float | None] | None = None):
        self.name = name
        self.outcomes = outcomes or []
        self.calls: list[UpscaleJob] = []
        self.cancelled = 0

    async def upscale(self, job: UpscaleJob) -> ProviderResult:
        self.calls.append(job)
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if isinstance(outcome, ProviderError):
            raise outcome
        if isinstance(outcome, float):
            try:
                await asyncio.sleep(outcome)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        job.billed(self.name, f"{self.name}-{len(self.calls)}")  # a job that succeeded bills
        return ProviderResult(
            image=b"img-" + self.name.encode(), content_type="image/png", provider_job_id="1"
        )

    async def aclose(self) -> None:
        return None


def router(*entries: ProviderEntry, **routing: object) -> Router:
    config = RoutingConfig(**{"explore_share": 0, **routing})  # type: ignore[arg-type]
    return Router(entries, config, MemoryStore(), Metrics(), rng=random.Random(1))


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


async def serve(
    r: Router,
    prefs: Preferences | None = None,
    required: frozenset[str] = frozenset(),
    hedge: bool = False,
    the_job: UpscaleJob | None = None,
    spend: Spend | None = None,
):  # type: ignore[no-untyped-def]
    plan = await r.plan(prefs or Preferences(), required)
    return await r.run(the_job or job(), plan, accept, hedge, spend)


def billed(spend: Spend) -> list[tuple[str, float, str]]:
    return [(c.provider, c.usd, c.kind) for c in spend.charges]


async def test_cheapest_first_and_flags_restrict() -> None:
    fal, rep = FakeAdapter("fal"), FakeAdapter("replicate")
    r = router(entry(rep, 0.006), entry(fal, 0.004, SAFETY))
    assert [c.entry.name for c in await r.plan(Preferences(), frozenset())] == ["fal", "replicate"]
    assert [c.entry.name for c in await r.plan(Preferences(), SAFETY)] == ["fal"]
    spend = Spend()
    served = await serve(r, spend=spend)
    assert served.value == b"img-fal" and [a.header() for a in served.attempts] == ["fal=ok"]
    assert billed(spend) == [("fal", 0.004, "served")]


async def test_retryable_fault_fails_over_and_feeds_the_breaker() -> None:
    fal = FakeAdapter("fal", [ProviderUnavailable("fal", "boom", upstream_status=500)] * 3)
    rep = FakeAdapter("replicate")
    r = router(
        entry(fal, 0.004),
        entry(rep, 0.006),
        breaker=BreakerConfig(failure_threshold=3, open_base_s=60),
    )
    for _ in range(3):
        served = await serve(r)
        assert served.provider.name == "replicate"
        assert [a.header() for a in served.attempts] == ["fal=ProviderUnavailable", "replicate=ok"]
    served = await serve(r)  # the circuit is open: fal is not tried
    assert [a.header() for a in served.attempts] == ["replicate=ok"] and len(fal.calls) == 3


async def test_half_open_probe_then_recovery() -> None:
    fal = FakeAdapter("fal", [ProviderUnavailable("fal", "boom")])
    rep = FakeAdapter("replicate")
    r = router(
        entry(fal, 0.004),
        entry(rep, 0.006),
        cache_ttl_s=0,
        breaker=BreakerConfig(failure_threshold=1, open_base_s=0.2),
    )
    await serve(r)
    assert (await serve(r)).provider.name == "replicate"
    await asyncio.sleep(0.25)
    probe = await serve(r)
    assert [a.header() for a in probe.attempts] == ["fal=ok+probe"]
    assert [a.header() for a in (await serve(r)).attempts] == ["fal=ok"]


async def test_unusable_output_fails_over() -> None:
    fal, rep = FakeAdapter("fal"), FakeAdapter("replicate")
    r = router(entry(fal, 0.004), entry(rep, 0.006))

    async def picky(provider: str, result: ProviderResult) -> bytes:
        if provider == "fal":
            raise ProviderBadResponse(provider, "truncated")
        return result.image

    served = await r.run(job(), await r.plan(Preferences(), frozenset()), picky)
    assert served.value == b"img-replicate"


async def test_callers_own_mistake_does_not_fail_over_or_trip() -> None:
    rejection = ProviderRejected("fal", "nsfw", code="content_policy_violation")
    fal, rep = FakeAdapter("fal", [rejection] * 5), FakeAdapter("replicate")
    r = router(entry(fal, 0.004), entry(rep, 0.006), breaker=BreakerConfig(failure_threshold=1))
    for _ in range(2):
        with pytest.raises(RoutingFailed) as failed:
            await serve(r)
        assert isinstance(failed.value.error, ImageRejected)
        assert failed.value.error.code == "content_policy_violation"
    assert not rep.calls
    assert (await r.store.snapshot(["fal"], time.time(), r.policy))["fal"].circuit(
        time.time()
    ) == "closed"


async def test_rate_limit_cools_down_without_tripping() -> None:
    fal = FakeAdapter("fal", [ProviderRateLimited("fal", "slow", retry_after=30)])
    rep = FakeAdapter("replicate")
    r = router(entry(fal, 0.004), entry(rep, 0.006), breaker=BreakerConfig(failure_threshold=1))
    await serve(r)
    served = await serve(r)
    assert [a.header() for a in served.attempts] == ["replicate=ok"]
    record = (await r.store.snapshot(["fal"], time.time(), r.policy))["fal"]
    assert record.circuit(time.time()) == "closed" and record.cooldown_until > time.time() + 20


async def test_all_down_is_503_naming_each_reason() -> None:
    fal = FakeAdapter("fal", [ProviderUnavailable("fal", "runner down", upstream_status=503)])
    rep = FakeAdapter("replicate", [ProviderRateLimited("replicate", "slow down", retry_after=7)])
    r = router(entry(fal, 0.004), entry(rep, 0.006))
    with pytest.raises(RoutingFailed) as failed:
        await serve(r)
    error = failed.value.error
    assert isinstance(error, NoProviderAvailable) and error.status == 503
    assert "fal: runner down" in error.message and "replicate: slow down" in error.message


async def test_open_circuits_are_503_with_retry_after() -> None:
    fal = FakeAdapter("fal", [ProviderUnavailable("fal", "x")])
    r = router(entry(fal, 0.004), cache_ttl_s=0, breaker=BreakerConfig(failure_threshold=1))
    with pytest.raises(RoutingFailed):
        await serve(r)
    with pytest.raises(NoProviderAvailable) as err:
        await r.plan(Preferences(), frozenset())
    assert "circuit open" in err.value.message and int(err.value.headers["retry-after"]) >= 1


async def test_all_nonsense_is_502() -> None:
    r = router(entry(FakeAdapter("fal", [ProviderBadResponse("fal", "not json")]), 0.004))
    with pytest.raises(RoutingFailed) as failed:
        await serve(r)
    assert isinstance(failed.value.error, UpstreamBadResponse)


async def test_no_candidate_for_a_flag_says_why() -> None:
    r = router(entry(FakeAdapter("replicate"), 0.006))
    with pytest.raises(NoProviderAvailable) as err:
        await r.plan(Preferences(), SAFETY)
    assert "enable_safety_checker=true" in err.value.message


async def test_preferences() -> None:
    fal, rep = FakeAdapter("fal"), FakeAdapter("replicate")
    r = router(entry(fal, 0.004), entry(rep, 0.006))
    names = [
        c.entry.name for c in await r.plan(Preferences(only=frozenset({"replicate"})), frozenset())
    ]
    assert names == ["replicate"]
    assert [
        c.entry.name for c in await r.plan(Preferences(ignore=frozenset({"fal"})), frozenset())
    ] == ["replicate"]
    assert [c.entry.name for c in await r.plan(Preferences(order=("replicate",)), frozenset())] == [
        "replicate",
        "fal",
    ]
    assert [
        c.entry.name for c in await r.plan(Preferences(allow_fallbacks=False), frozenset())
    ] == ["fal"]
    assert [c.entry.name for c in await r.plan(Preferences(max_price=0.005), frozenset())] == [
        "fal"
    ]
    with pytest.raises(InvalidRequest) as err:
        await r.plan(Preferences(max_price=0.001), frozenset())
    assert err.value.param == "provider.max_price"


async def test_fastest_prefers_the_measured_faster() -> None:
    fal, rep = FakeAdapter("fal", [0.05] * 10), FakeAdapter("replicate")
    r = router(entry(fal, 0.004), entry(rep, 0.006), strategy="fastest", cache_ttl_s=0)
    await serve(r, Preferences(order=("fal",)))
    await serve(r, Preferences(order=("replicate",)))
    assert (await r.plan(Preferences(), frozenset()))[0].entry.name == "replicate"


async def test_hedge_wins_and_loser_is_cancelled_and_counted() -> None:
    fal, rep = FakeAdapter("fal", [2.0]), FakeAdapter("replicate")
    r = router(
        entry(fal, 0.004),
        entry(rep, 0.006),
        hedge=HedgeConfig(enabled=True, delay=0.05, budget_min_per_minute=5),
    )
    spend = Spend()
    served = await serve(r, hedge=True, spend=spend)
    assert served.provider.name == "replicate"
    assert [a.header() for a in served.attempts] == ["replicate=ok+hedge", "fal=cancelled"]
    # The loser was cancelled before its job billed: only what the providers bill counts.
    assert billed(spend) == [("replicate", 0.006, "served")] and fal.cancelled == 1


async def test_hedge_budget_denies_extra_hedges() -> None:
    fal, rep = FakeAdapter("fal", [0.3, 0.3]), FakeAdapter("replicate")
    r = router(
        entry(fal, 0.004),
        entry(rep, 0.006),
        hedge=HedgeConfig(enabled=True, delay=0.05, budget_share=0, budget_min_per_minute=1),
    )
    assert (await serve(r, hedge=True)).provider.name == "replicate"
    spend = Spend()
    served = await serve(r, hedge=True, spend=spend)  # budget spent: wait for the primary
    assert served.provider.name == "fal" and billed(spend) == [("fal", 0.004, "served")]


async def test_attempt_budget_leaves_time_for_the_next_candidate() -> None:
    slow, rep = FakeAdapter("fal"), FakeAdapter("replicate")
    r = router(entry(slow, 0.004, attempt_timeout_s=0.5), entry(rep, 0.006))
    await serve(r, the_job=job(timeout=30))
    assert slow.calls[0].deadline <= time.monotonic() + 0.5


async def test_deadline_passed_is_504() -> None:
    r = router(entry(FakeAdapter("fal", [ProviderError("fal", "x")]), 0.004))
    expired = UpscaleJob(b"png", 10, 10, time.monotonic() - 1, "req_1", {})
    with pytest.raises(RoutingFailed) as failed:
        await serve(r, the_job=expired)
    assert isinstance(failed.value.error, DeadlineExceeded)


async def test_prices_bound_what_a_request_may_cost() -> None:
    r = router(entry(FakeAdapter("fal"), 0.004), entry(FakeAdapter("replicate"), 0.006))
    assert await r.prices(Preferences()) == (0.006, 0.004)
    assert await r.prices(Preferences(hedge=True)) == (pytest.approx(0.010), 0.004)
    assert await r.prices(Preferences(only=frozenset({"fal"}))) == (0.004, 0.004)
    assert await r.prices(Preferences(max_price=0.005)) == (0.004, 0.004)
    await r.store.set_price("fal", 0.008)  # an operator's price counts, also for routing
    r.forget()
    assert await r.prices(Preferences()) == (0.008, 0.006)
    plan = await r.plan(Preferences(), frozenset())
    assert [c.entry.name for c in plan] == ["replicate", "fal"]
    spend = Spend()
    await r.run(job(), plan, accept, spend=spend)
    assert billed(spend) == [("replicate", 0.006, "served")]


async def test_a_failed_request_says_why_the_others_were_not_tried() -> None:
    fal = FakeAdapter("fal")
    rep = FakeAdapter("replicate", [ProviderUnavailable("replicate", "HTTP 500")])
    r = router(entry(fal, 0.004), entry(rep, 0.006))
    await r.store.set_cooldown("fal", time.time() + 30)
    with pytest.raises(RoutingFailed) as failed:
        await serve(r)
    message = failed.value.error.message
    assert "replicate: HTTP 500" in message
    assert "fal: not tried, rate limited, cooling down" in message
    assert fal.calls == []


async def test_a_journaled_job_is_followed_even_on_a_provider_left_out() -> None:
    fal, rep = FakeAdapter("fal"), FakeAdapter("replicate")
    r = router(entry(fal, 0.004), entry(rep, 0.006))
    await r.store.set_drained("fal", True)
    plan = await r.plan(Preferences(), frozenset())
    assert [c.entry.name for c in plan] == ["replicate"]
    resumed = dataclasses.replace(job(), resume=(("fal", {"request_id": "r1"}),))
    served = await r.run(resumed, plan, accept)
    assert served.provider.name == "fal" and fal.calls[0].resume == (("fal", {"request_id": "r1"}),)
    assert rep.calls == []


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.snapshots = 0

    async def snapshot(self, providers, now, policy):  # type: ignore[no-untyped-def]
        self.snapshots += 1
        return await super().snapshot(providers, now, policy)


async def test_attempts_refresh_the_cached_view_without_dropping_it() -> None:
    fal = FakeAdapter("fal", [ProviderUnavailable("fal", "boom", upstream_status=500)])
    store = CountingStore()
    config = RoutingConfig(explore_share=0, cache_ttl_s=60)
    entries = (entry(fal, 0.004), entry(FakeAdapter("replicate"), 0.006))
    r = Router(entries, config, store, Metrics())
    for _ in range(5):
        await serve(r)
    assert store.snapshots == 1  # one read of the shared records for five requests
    # ... and the view holds what the attempts recorded: fal failed once (replicate served
    # that request), then served the other four.
    records = await r.records()
    assert (records["fal"].failures, records["fal"].successes) == (1, 4)
    assert records["replicate"].successes == 1


async def test_a_run_that_lost_its_claim_submits_nothing_new() -> None:
    """A retry took the request's Idempotency-Key over: this run may still follow the job
    it journaled, but never submits (and pays for) another one."""
    fal = FakeAdapter("fal", [ProviderUnavailable("fal", "boom", upstream_status=500)])
    rep = FakeAdapter("replicate")
    r = router(entry(fal, 0.004), entry(rep, 0.006))
    lost = dataclasses.replace(
        job(), resume=(("fal", {"request_id": "r1"}),), may_submit=lambda: False
    )
    with pytest.raises(RoutingFailed) as failed:
        await serve(r, the_job=lost)  # the followed job failed: failing over would submit anew
    assert failed.value.error.code == "idempotency_key_in_use"
    assert len(fal.calls) == 1 and rep.calls == []
    owned = dataclasses.replace(lost, may_submit=lambda: True)
    assert (await serve(r, the_job=owned)).provider.name == "fal"


async def test_every_journaled_job_of_an_image_is_followed_at_once() -> None:
    """The earlier claimant hedged: fal's job and Replicate's are both journaled. The run
    that took the claim over follows both (neither is left running, unfollowed and billed);
    the first to finish serves, the other is cancelled."""
    fal, rep = FakeAdapter("fal", [1.0]), FakeAdapter("replicate", [0.05])
    r = router(entry(fal, 0.004), entry(rep, 0.006))
    plan = await r.plan(Preferences(), frozenset())
    both = dataclasses.replace(
        job(), resume=(("fal", {"request_id": "r1"}), ("replicate", {"id": "p1"}))
    )
    spend = Spend()
    served = await r.run(both, plan, accept, spend=spend)
    assert served.provider.name == "replicate" and fal.cancelled == 1
    assert [c.resume for c in fal.calls] == [
        (("fal", {"request_id": "r1"}), ("replicate", {"id": "p1"}))
    ]
    assert len(rep.calls) == 1 and billed(spend) == [("replicate", 0.006, "served")]


async def test_a_provider_unfit_for_the_input_is_skipped_and_each_attempt_gets_its_own() -> None:
    fal, rep = FakeAdapter("fal"), FakeAdapter("replicate")
    r = router(entry(fal, 0.004), entry(rep, 0.006))
    unfit = {"fal": "fal takes PNG up to 10.0 MB: this image is 13.9 MB at its smallest (PNG)"}
    plan = await r.plan(Preferences(), frozenset(), "req_1", unfit)
    assert [c.entry.name for c in plan] == ["replicate"] and plan.excluded == unfit
    the_job = dataclasses.replace(
        job(), inputs={"replicate": (b"jpeg-bytes", "image/jpeg"), "fal": (b"png", "image/png")}
    )
    await r.run(the_job, plan, accept, False, Spend())
    assert (rep.calls[0].image, rep.calls[0].mime) == (b"jpeg-bytes", "image/jpeg")
    assert fal.calls == []


async def test_an_input_no_admitted_provider_can_take_is_the_callers_400() -> None:
    fal, rep = FakeAdapter("fal"), FakeAdapter("replicate")
    r = router(entry(fal, 0.004), entry(rep, 0.006))
    with pytest.raises(InvalidRequest) as err:
        await r.plan(Preferences(only=("fal",)), frozenset(), "req_1", {"fal": "too big"})
    assert err.value.code == "image_unsupported_by_providers" and "too big" in str(err.value)
    assert r.admitted(Preferences(only=("fal",))) == ["fal"]
    assert r.admitted(Preferences(ignore=("fal",))) == ["replicate"]


async def test_a_flag_and_an_unfit_input_together_leave_no_provider_a_400() -> None:
    fal, rep = FakeAdapter("fal"), FakeAdapter("replicate")
    r = router(entry(fal, 0.004, SAFETY), entry(rep, 0.006))
    with pytest.raises(InvalidRequest) as err:
        await r.plan(Preferences(), SAFETY, "req_1", {"fal": "fal takes PNG/JPEG up to 10.0 MB"})
    assert err.value.code == "image_unsupported_by_providers"
    assert "replicate: does not support enable_safety_checker=true" in str(err.value)
