"""One contract, two stores: the in-process store and the Redis store (a redis-server of the
test's own) must agree on every operation the router relies on."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.state.base import Hold, Outcome, Period, Policy, Quota, StateStore
from gateway.state.memory import MemoryStore
from gateway.state.redis import RedisStore
from gateway.state.resilient import ResilientStore
from tests.integration.redis_server import RedisServer
from tests.integration.servers import free_port

pytestmark = pytest.mark.anyio
POLICY = Policy(failure_threshold=3, open_base_s=5, open_max_s=40, bucket_s=10, window_s=60)
OK = Outcome(True, 0.3)
FAIL = Outcome(False, None, "HTTP 500")
_prefixes = itertools.count()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    server = request.getfixturevalue("redis_server")
    redis_store = RedisStore(server.url, prefix=f"t{next(_prefixes)}")
    yield redis_store
    await redis_store.aclose()


async def test_successes_measure_latency(store: StateStore) -> None:
    for latency in (0.1, 0.2, 0.3, 0.4, 4.0):
        await store.record("fal", Outcome(True, latency), 1000.0, POLICY)
    rec = (await store.snapshot(["fal"], 1000.0, POLICY))["fal"]
    assert rec.successes == 5 and rec.failures == 0 and rec.circuit(1000.0) == "closed"
    assert rec.p50_s is not None and 0.2 <= rec.p50_s <= 0.35
    assert rec.p95_s is not None and rec.p95_s >= 3.0
    assert rec.ewma_s is not None and 0.1 < rec.ewma_s < 4.0


async def test_breaker_opens_backs_off_and_recovers(store: StateStore) -> None:
    now = 2000.0
    for _ in range(2):
        rec = await store.record("fal", FAIL, now, POLICY)
    assert rec.circuit(now) == "closed" and rec.consecutive_failures == 2
    rec = await store.record("fal", FAIL, now, POLICY)
    assert rec.circuit(now) == "open" and rec.open_until == pytest.approx(now + 5)
    assert rec.last_error == "HTTP 500"
    assert rec.circuit(now + 5) == "half_open"
    rec = await store.record("fal", FAIL, now + 5, POLICY)  # the probe fails: longer backoff
    assert rec.circuit(now + 6) == "open" and rec.open_until == pytest.approx(now + 15)
    rec = await store.record("fal", OK, now + 15, POLICY)  # the next probe succeeds
    assert rec.circuit(now + 15) == "closed" and rec.opened_count == 0
    assert rec.recovered_at == pytest.approx(now + 15)
    other = (await store.snapshot(["replicate"], now, POLICY))["replicate"]
    assert other.circuit(now) == "closed" and other.successes == 0


async def test_backoff_is_capped(store: StateStore) -> None:
    now = 3000.0
    for _ in range(10):
        rec = await store.record("fal", FAIL, now, POLICY)
    assert rec.open_until - now == pytest.approx(40)


async def test_window_forgets_old_buckets(store: StateStore) -> None:
    await store.record("fal", FAIL, 4000.0, POLICY)
    await store.record("fal", OK, 4000.0, POLICY)
    later = (await store.snapshot(["fal"], 4000.0 + 120, POLICY))["fal"]
    assert later.successes == 0 and later.failures == 0 and later.p95_s is None


async def test_one_probe_at_a_time(store: StateStore) -> None:
    assert await store.try_probe("fal", "a", 5)
    assert not await store.try_probe("fal", "b", 5)
    await store.release_probe("fal", "b")  # not the holder: no effect
    assert not await store.try_probe("fal", "c", 5)
    await store.release_probe("fal", "a")
    assert await store.try_probe("fal", "d", 0.05)
    await asyncio.sleep(0.1)
    assert await store.try_probe("fal", "e", 5)  # an abandoned probe expires


async def test_cooldown_and_drain(store: StateStore) -> None:
    await store.set_cooldown("fal", 5000.0)
    await store.set_cooldown("fal", 4000.0)  # never shortened
    await store.set_drained("replicate", True)
    recs = await store.snapshot(["fal", "replicate"], 100.0, POLICY)
    assert recs["fal"].cooldown_until == 5000.0 and not recs["fal"].drained
    assert recs["replicate"].drained
    await store.set_drained("replicate", False)
    assert not (await store.snapshot(["replicate"], 100.0, POLICY))["replicate"].drained


async def test_hedge_budget(store: StateStore) -> None:
    now = 6000.0
    assert await store.take_hedge(now, 0.1, 1)  # the per-minute minimum
    assert not await store.take_hedge(now, 0.1, 1)
    for _ in range(20):
        await store.count_request(now)
    taken = [await store.take_hedge(now, 0.1, 1) for _ in range(5)]
    assert taken == [True, True, False, False, False]  # floor(0.1 * 20) + 1 = 3 in all
    assert await store.take_hedge(now + 60, 0.1, 1)  # a new minute, a new budget


async def test_concurrent_failures_are_counted_exactly(store: StateStore) -> None:
    policy = Policy(failure_threshold=1000)
    await asyncio.gather(*(store.record("fal", FAIL, 7000.0, policy) for _ in range(50)))
    rec = (await store.snapshot(["fal"], 7000.0, policy))["fal"]
    assert rec.consecutive_failures == 50 and rec.failures == 50


async def test_idempotency_key_is_claimed_once_then_replayed(store: StateStore) -> None:
    key, now = f"idem{next(_prefixes)}", time.time()
    assert (await store.idem_begin(key, "fp1", 30, now)).state == "new"
    assert (await store.idem_begin(key, "fp1", 30, now)).state == "pending"
    assert (await store.idem_begin(key, "fp2", 30, now)).state == "conflict"
    await store.idem_finish(key, "fp2", '{"other": 1}', 60)  # not the claimant's: ignored
    await store.idem_finish(key, "fp1", '{"body": "x"}', 60)
    claim = await store.idem_begin(key, "fp1", 30, now)
    assert claim.state == "done" and claim.response == '{"body": "x"}'
    await store.idem_release(key, "fp1")  # a finished key is never released
    assert (await store.idem_begin(key, "fp1", 30, now)).state == "done"


async def test_idempotency_release_frees_the_key(store: StateStore) -> None:
    key, now = f"idem{next(_prefixes)}", time.time()
    assert (await store.idem_begin(key, "fp1", 30, now)).state == "new"
    await store.idem_release(key, "other")  # only the claimant's fingerprint releases
    assert (await store.idem_begin(key, "fp1", 30, now)).state == "pending"
    await store.idem_release(key, "fp1")
    assert (await store.idem_begin(key, "fp2", 30, now)).state == "new"


async def test_a_lapsed_lease_is_taken_over_with_its_journal(store: StateStore) -> None:
    key, now = f"idem{next(_prefixes)}", time.time()
    assert (await store.idem_begin(key, "fp1", 10, now)).state == "new"
    await store.idem_note(key, "fp1", "0", '{"provider": "fal"}')
    await store.idem_note(key, "other", "1", "{}")  # only the claimant notes
    await store.idem_renew(key, "fp1", 10, now + 8)  # alive: renewed to now + 18
    assert (await store.idem_begin(key, "fp1", 10, now + 15)).state == "pending"
    # The claimant died: after its lease, the same request takes over, journal and all ...
    taken = await store.idem_begin(key, "fp1", 10, now + 19)
    assert taken.state == "takeover" and taken.journal == {"job:0": '{"provider": "fal"}'}
    assert (await store.idem_begin(key, "fp1", 10, now + 20)).state == "pending"
    assert (await store.idem_begin(key, "fp2", 10, now + 40)).state == "conflict"  # ... not another
    await store.idem_finish(key, "fp1", '{"body": "y"}', 60)
    assert (await store.idem_begin(key, "fp1", 10, now + 41)).state == "done"


NO_LIMIT = Quota()
DAY = 1_780_000_000.0  # 2026-05-28 20:26 UTC


async def test_admit_holds_the_worst_case_until_settled(store: StateStore) -> None:
    quota = Quota(micros_per_day=10_000)
    assert (await store.admit("k", "t1", Hold(6_000, 6_000), quota, DAY, 60)).limit == ""
    refused = await store.admit(
        "k", "t2", Hold(6_000, 6_000), quota, DAY, 60
    )  # 6 000 held + 6 000 > 10 000
    assert refused.limit == "usd_per_day" and 0 < refused.retry_after_s <= 86400
    await store.settle("k", "t1", 4_000, {"requests": 1, "micros:fal": 4_000}, DAY)
    assert (await store.admit("k", "t2", Hold(6_000, 6_000), quota, DAY, 60)).limit == ""
    await store.settle("k", "t2", 4_000, {"requests": 1, "micros:fal": 4_000}, DAY)
    assert (await store.admit("k", "t3", Hold(4_000, 4_000), quota, DAY, 60)).limit == "usd_per_day"
    ledger = await store.ledger(["k"], [Period.of(DAY).day])
    assert ledger["k"][Period.of(DAY).day] == {"micros": 8_000, "requests": 2, "micros:fal": 8_000}


async def test_the_cheapest_plan_is_held_when_only_it_fits(store: StateStore) -> None:
    quota = Quota(micros_per_day=8_000)
    await store.admit("h", "a", Hold(6_000, 4_000), quota, DAY, 60)
    await store.settle("h", "a", 4_000, {"requests": 1}, DAY)
    admitted = await store.admit("h", "b", Hold(6_000, 4_000), quota, DAY, 60)
    assert admitted.limit == "" and admitted.held == 4_000  # 4 000 + 6 000 would not fit
    refused = await store.admit("h", "c", Hold(6_000, 4_000), quota, DAY, 60)
    assert refused.limit == "usd_per_day"  # 4 000 spent + 4 000 held: nothing else fits
    fresh = await store.admit("h2", "a", Hold(6_000, 4_000), quota, DAY, 60)
    assert fresh.held == 6_000


async def test_month_budget_spans_days_and_other_keys_are_apart(store: StateStore) -> None:
    quota = Quota(micros_per_month=5_000)
    await store.admit("m", "a", Hold(4_000, 4_000), quota, DAY, 60)
    await store.settle("m", "a", 4_000, {"requests": 1}, DAY)
    refused = await store.admit("m", "b", Hold(4_000, 4_000), quota, DAY + 86400, 60)
    assert refused.limit == "usd_per_month"
    assert (await store.admit("other", "b", Hold(4_000, 4_000), quota, DAY + 86400, 60)).limit == ""


async def test_requests_per_minute_bursts_then_spaces(store: StateStore) -> None:
    quota = Quota(requests_per_minute=3)
    for n in range(3):
        admitted = await store.admit("r", f"t{n}", Hold(0, 0), quota, DAY, 60)
        assert admitted.limit == ""
        await store.settle("r", f"t{n}", 0, {}, DAY)
    refused = await store.admit("r", "t3", Hold(0, 0), quota, DAY, 60)
    assert refused.limit == "requests_per_minute"
    assert refused.retry_after_s == pytest.approx(20, abs=0.01)  # one every 60/3 s
    assert (await store.admit("r", "t4", Hold(0, 0), quota, DAY + 20.01, 60)).limit == ""


async def test_concurrency_counts_leases_and_expired_leases_free(store: StateStore) -> None:
    quota = Quota(max_concurrent=2)
    assert (await store.admit("c", "a", Hold(0, 0), quota, DAY, 30)).limit == ""
    assert (await store.admit("c", "b", Hold(0, 0), quota, DAY, 30)).limit == ""
    assert (await store.admit("c", "c", Hold(0, 0), quota, DAY, 30)).limit == "max_concurrent"
    await store.settle("c", "a", 0, {}, DAY)
    assert (await store.admit("c", "c", Hold(0, 0), quota, DAY, 30)).limit == ""
    # A replica that died never settles: its lease runs out.
    assert (await store.admit("c", "d", Hold(0, 0), quota, DAY + 31, 30)).limit == ""


async def test_ledger_lists_every_account(store: StateStore) -> None:
    day = Period.of(DAY).day
    for account in ("x", "y"):
        await store.admit(account, "t", Hold(0, 0), NO_LIMIT, DAY, 60)
        await store.settle(account, "t", 6_000, {"requests": 1, "images:replicate": 1}, DAY)
    ledger = await store.ledger(None, [day])
    assert {"x", "y"} <= set(ledger)
    assert ledger["y"][day]["images:replicate"] == 1


async def test_events_add_up_over_the_hour(store: StateStore) -> None:
    await store.count_events(DAY, {"requests": 2, "failovers": 1})
    await store.count_events(DAY + 600, {"requests": 1})
    await store.count_events(DAY - 4000, {"requests": 7})  # over an hour before
    assert await store.recent_events(DAY + 600, 60) == {"requests": 3, "failovers": 1}


async def test_price_override_and_breaker_reset(store: StateStore) -> None:
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


async def test_without_redis_budgets_fail_closed_and_rates_go_local() -> None:
    store = ResilientStore(RedisStore(f"redis://127.0.0.1:{free_port()}/0"))
    budget = Quota(micros_per_day=1_000_000)
    refused = await store.admit("k", "a", Hold(4_000, 4_000), budget, DAY, 60)
    assert refused.limit == "state_store_unavailable"
    lenient = Quota(micros_per_day=1_000_000, shared_only=False)
    assert (await store.admit("k", "b", Hold(4_000, 4_000), lenient, DAY, 60)).limit == ""
    rated = Quota(requests_per_minute=1)
    assert (await store.admit("k", "c", Hold(0, 0), rated, DAY, 60)).limit == ""
    assert (await store.admit("k", "d", Hold(0, 0), rated, DAY, 60)).limit != ""
    await store.aclose()


async def test_a_settle_that_missed_redis_lands_once_when_it_returns(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    store = ResilientStore(RedisStore(server.url), retry_after_s=0.2)
    await store.admit("s", "t", Hold(4_000, 4_000), NO_LIMIT, DAY, 60)
    server.stop()
    await store.settle("s", "t", 4_000, {"requests": 1}, DAY)  # kept for later
    server = RedisServer(tmp_path, port=server.port).start()
    try:
        day = Period.of(DAY).day
        for _ in range(50):
            await asyncio.sleep(0.1)
            if (await store.primary.ledger(["s"], [day]))["s"]:
                break
        await store.primary.settle("s", "t", 4_000, {"requests": 1}, DAY)  # a late duplicate
        assert (await store.primary.ledger(["s"], [day]))["s"][day] == {
            "micros": 4_000,
            "requests": 1,
        }
    finally:
        await store.aclose()
        server.stop()


async def test_a_flaky_provider_is_not_shut_by_a_run_of_failures(store: StateStore) -> None:
    now = 9000.0
    for _ in range(7):
        await store.record("flaky", OK, now, POLICY)
    for _ in range(3):  # three in a row, but 30 % of the window: failover handles these
        rec = await store.record("flaky", FAIL, now, POLICY)
    assert rec.circuit(now) == "closed" and rec.consecutive_failures == 3
    for _ in range(4):  # now 7 of 14 failed: half the window
        rec = await store.record("flaky", FAIL, now + 1, POLICY)
    assert rec.circuit(now + 1) == "open"
