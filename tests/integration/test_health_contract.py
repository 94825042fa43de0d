"""The health contract: the in-process and the Redis provider records (MemoryHealth,
RedisHealth, and the stores composed of them) must agree on every operation the router
relies on: windows and latency, the breaker, the probe lock, cool-downs, drains, prices
and the hedge budget. The breaker's rules are also checked against a reference model in
test_breaker_model.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from gateway.state.base import HealthStore, Outcome, Policy
from gateway.state.memory import MemoryHealth
from gateway.state.redis import RedisHealth
from tests.integration.state_stores import KINDS, implementation

pytestmark = pytest.mark.anyio
POLICY = Policy(failure_threshold=3, open_base_s=5, open_max_s=40, bucket_s=10, window_s=60)
OK = Outcome(True, 0.3)
FAIL = Outcome(False, None, "HTTP 500")
PROBE_OK = Outcome(True, 0.3, probe=True)
PROBE_FAIL = Outcome(False, None, "HTTP 500", probe=True)


@pytest.fixture(params=KINDS)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[HealthStore]:
    async with implementation(request, MemoryHealth, RedisHealth) as store:
        yield store


async def test_successes_measure_latency(store: HealthStore) -> None:
    for latency in (0.1, 0.2, 0.3, 0.4, 4.0):
        await store.record("fal", Outcome(True, latency), 1000.0, POLICY)
    rec = (await store.snapshot(["fal"], 1000.0, POLICY))["fal"]
    assert rec.successes == 5 and rec.failures == 0 and rec.circuit(1000.0) == "closed"
    assert rec.p50_s is not None and 0.2 <= rec.p50_s <= 0.35
    assert rec.p95_s is not None and rec.p95_s >= 3.0
    assert rec.ewma_s is not None and 0.1 < rec.ewma_s < 4.0


async def test_breaker_opens_backs_off_and_recovers(store: HealthStore) -> None:
    now = 2000.0
    for _ in range(2):
        rec = await store.record("fal", FAIL, now, POLICY)
    assert rec.circuit(now) == "closed" and rec.consecutive_failures == 2
    rec = await store.record("fal", FAIL, now, POLICY)
    assert rec.circuit(now) == "open" and rec.open_until == pytest.approx(now + 5)
    assert rec.last_error == "HTTP 500"
    assert rec.circuit(now + 5) == "half_open"
    rec = await store.record("fal", PROBE_FAIL, now + 5, POLICY)  # the probe fails: longer backoff
    assert rec.circuit(now + 6) == "open" and rec.open_until == pytest.approx(now + 15)
    rec = await store.record("fal", PROBE_OK, now + 15, POLICY)  # the next probe succeeds
    assert rec.circuit(now + 15) == "closed" and rec.opened_count == 0
    assert rec.recovered_at == pytest.approx(now + 15)
    other = (await store.snapshot(["replicate"], now, POLICY))["replicate"]
    assert other.circuit(now) == "closed" and other.successes == 0


async def test_backoff_is_capped(store: HealthStore) -> None:
    now = 3000.0
    for _ in range(10):  # three trip it, then each probe fails as soon as it is half-open
        rec = await store.record("fal", PROBE_FAIL, now, POLICY)
        now = max(now, rec.open_until)
    assert rec.opened_count == 8 and rec.open_until - rec.changed_at == pytest.approx(40)


async def test_window_forgets_old_buckets(store: HealthStore) -> None:
    await store.record("fal", FAIL, 4000.0, POLICY)
    await store.record("fal", OK, 4000.0, POLICY)
    later = (await store.snapshot(["fal"], 4000.0 + 120, POLICY))["fal"]
    assert later.successes == 0 and later.failures == 0 and later.p95_s is None


async def test_one_probe_at_a_time(store: HealthStore) -> None:
    assert await store.try_probe("fal", "a", 5)
    assert not await store.try_probe("fal", "b", 5)
    await store.release_probe("fal", "b")  # not the holder: no effect
    assert not await store.try_probe("fal", "c", 5)
    await store.release_probe("fal", "a")
    assert await store.try_probe("fal", "d", 0.05)
    await asyncio.sleep(0.1)
    assert await store.try_probe("fal", "e", 5)  # an abandoned probe expires


async def test_cooldown_and_drain(store: HealthStore) -> None:
    await store.set_cooldown("fal", 5000.0)
    await store.set_cooldown("fal", 4000.0)  # never shortened
    await store.set_drained("replicate", True)
    recs = await store.snapshot(["fal", "replicate"], 100.0, POLICY)
    assert recs["fal"].cooldown_until == 5000.0 and not recs["fal"].drained
    assert recs["replicate"].drained
    await store.set_drained("replicate", False)
    assert not (await store.snapshot(["replicate"], 100.0, POLICY))["replicate"].drained


async def test_hedge_budget(store: HealthStore) -> None:
    now = 6000.0
    assert await store.take_hedge(now, 0.1, 1)  # the per-minute minimum
    assert not await store.take_hedge(now, 0.1, 1)
    for _ in range(20):
        await store.count_request(now)
    taken = [await store.take_hedge(now, 0.1, 1) for _ in range(5)]
    assert taken == [True, True, False, False, False]  # floor(0.1 * 20) + 1 = 3 in all
    assert await store.take_hedge(now + 60, 0.1, 1)  # a new minute, a new budget


async def test_concurrent_failures_are_counted_exactly(store: HealthStore) -> None:
    policy = Policy(failure_threshold=1000)
    await asyncio.gather(*(store.record("fal", FAIL, 7000.0, policy) for _ in range(50)))
    rec = (await store.snapshot(["fal"], 7000.0, policy))["fal"]
    assert rec.consecutive_failures == 50 and rec.failures == 50


async def test_price_override_and_breaker_reset(store: HealthStore) -> None:
    now = 5000.0
    await store.set_price("fal", 0.01)
    for _ in range(3):
        await store.record("fal", FAIL, now, POLICY)
    rec = (await store.snapshot(["fal"], now, POLICY))["fal"]
    assert rec.price_usd == 0.01 and rec.circuit(now) == "open"
    await store.reset_breaker("fal")
    await store.set_price("fal", None)
    rec = (await store.snapshot(["fal"], now, POLICY))["fal"]
    assert rec.price_usd is None and rec.circuit(now) == "closed"
    assert rec.consecutive_failures == 0 and rec.failures == 0  # the window starts afresh


async def test_a_flaky_provider_is_not_shut_by_a_run_of_failures(store: HealthStore) -> None:
    now = 9000.0
    for _ in range(7):
        await store.record("flaky", OK, now, POLICY)
    for _ in range(3):  # three in a row, but 30 % of the window: failover handles these
        rec = await store.record("flaky", FAIL, now, POLICY)
    assert rec.circuit(now) == "closed" and rec.consecutive_failures == 3
    for _ in range(4):  # now 7 of 14 failed: half the window
        rec = await store.record("flaky", FAIL, now + 1, POLICY)
    assert rec.circuit(now + 1) == "open"


# Breaker escalation (issue 11): attempts in flight when the breaker changed state count in
# the window but move nothing; only the half-open probe moves an open breaker.


async def _trip(store: HealthStore, provider: str, now: float) -> None:
    for _ in range(POLICY.failure_threshold):
        rec = await store.record(provider, FAIL, now, POLICY)
    assert rec.circuit(now) == "open" and rec.opened_count == 1
    assert rec.changed_at == pytest.approx(now)


async def test_failures_in_flight_at_a_trip_do_not_escalate_it(store: HealthStore) -> None:
    now = 10_000.0
    started = now - 1.0  # twenty attempts already running when fal trips
    await _trip(store, "fal", now)
    old_fail = Outcome(False, None, "HTTP 503", started_at=started)
    for n in range(20):
        rec = await store.record("fal", old_fail, now + 0.1 * n, POLICY)
    assert rec.opened_count == 1 and rec.open_until == pytest.approx(now + POLICY.open_base_s)
    assert rec.consecutive_failures == POLICY.failure_threshold
    assert rec.failures == POLICY.failure_threshold + 20  # they still count in the window
    assert rec.last_error == "HTTP 503"


async def test_a_late_success_does_not_close_an_open_breaker(store: HealthStore) -> None:
    now = 11_000.0
    await _trip(store, "fal", now)
    rec = await store.record("fal", Outcome(True, 0.3, started_at=now - 1), now + 1, POLICY)
    assert rec.circuit(now + 1) == "open" and rec.opened_count == 1 and rec.successes == 1
    assert rec.ewma_s == pytest.approx(0.3)  # measured all the same
    # Nor does a success that is not the probe, once half-open.
    rec = await store.record("fal", OK, now + 6, POLICY)
    assert rec.circuit(now + 6) == "half_open" and rec.recovered_at == 0.0


async def test_only_the_probe_moves_an_open_breaker(store: HealthStore) -> None:
    now = 12_000.0
    await _trip(store, "fal", now)
    probe_at = now + POLICY.open_base_s
    failed = Outcome(False, None, "HTTP 503", started_at=probe_at, probe=True)
    rec = await store.record("fal", failed, probe_at + 1, POLICY)  # the probe fails
    assert rec.opened_count == 2 and rec.open_until == pytest.approx(probe_at + 1 + 10)
    assert rec.changed_at == pytest.approx(probe_at + 1)
    # Not the probe (a straggler, even one started after the trip): no further doubling.
    straggler = Outcome(False, None, "HTTP 503", started_at=now + 2)
    rec = await store.record("fal", straggler, probe_at + 2, POLICY)
    assert rec.opened_count == 2 and rec.open_until == pytest.approx(probe_at + 1 + 10)
    probe_at = probe_at + 11
    rec = await store.record(
        "fal", Outcome(True, 0.3, started_at=probe_at, probe=True), probe_at + 1, POLICY
    )
    assert rec.circuit(probe_at + 1) == "closed" and rec.opened_count == 0
    assert rec.consecutive_failures == 0
    assert rec.recovered_at == pytest.approx(probe_at + 1)
    assert rec.changed_at == pytest.approx(probe_at + 1)


async def test_old_failures_after_the_probe_closed_it_do_not_trip_it(store: HealthStore) -> None:
    now = 13_000.0
    await _trip(store, "fal", now)
    probe_at = now + POLICY.open_base_s
    closed_at = probe_at + 0.5
    rec = await store.record(
        "fal", Outcome(True, 0.3, started_at=probe_at, probe=True), closed_at, POLICY
    )
    assert rec.circuit(closed_at) == "closed"
    old_fail = Outcome(False, None, "HTTP 503", started_at=now - 1)  # in flight since the blip
    for n in range(20):
        rec = await store.record("fal", old_fail, closed_at + 0.1 * n, POLICY)
    assert rec.circuit(closed_at + 2) == "closed" and rec.consecutive_failures == 0
    # Attempts started after it closed count again: three fresh failures trip it anew.
    fresh = Outcome(False, None, "HTTP 503", started_at=closed_at + 3)
    for _ in range(POLICY.failure_threshold):
        rec = await store.record("fal", fresh, closed_at + 4, POLICY)
    assert rec.circuit(closed_at + 4) == "open" and rec.opened_count == 1


async def test_a_probe_taken_on_a_stale_view_moves_nothing(store: HealthStore) -> None:
    now = 15_000.0
    await _trip(store, "fal", now)
    probe_at = now + POLICY.open_base_s
    failed = Outcome(False, None, "HTTP 503", started_at=probe_at, probe=True)
    rec = await store.record("fal", failed, probe_at + 0.5, POLICY)  # re-opened until +10.5
    # Replicas whose one-second view still says half-open take the freed lock: their probes
    # started before the new open_until and tell nothing about it, failing or not.
    early = probe_at + 0.8
    for ok in (False, False, True):
        stale = Outcome(ok, 0.3 if ok else None, "HTTP 503", started_at=early, probe=True)
        rec = await store.record("fal", stale, early + 0.3, POLICY)
        assert rec.opened_count == 2 and rec.open_until == pytest.approx(probe_at + 10.5)
        assert rec.circuit(early + 0.3) == "open"


async def test_a_reset_marks_a_transition(store: HealthStore) -> None:
    now = 14_000.0
    await _trip(store, "fal", now)
    before = time.time()
    await store.reset_breaker("fal")
    rec = (await store.snapshot(["fal"], now, POLICY))["fal"]
    assert rec.circuit(now) == "closed" and rec.changed_at >= before
