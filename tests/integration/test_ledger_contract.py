"""The ledger contract: the in-process and the Redis ledgers (MemoryLedger, RedisLedger, and
the stores composed of them) must agree on admission (budgets, holds, rates, concurrency)
and on the spend ledger; and the resilient store fails budgets closed without Redis and
lands a settle that missed it exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.state.base import Hold, JobCharge, LedgerStore, Period, Quota
from gateway.state.memory import MemoryLedger
from gateway.state.redis import MAX_CONNECTIONS, RedisLedger, RedisStore, connect
from gateway.state.resilient import ResilientStore
from tests.integration.redis_server import RedisServer
from tests.integration.servers import free_port
from tests.integration.state_stores import KINDS, fresh, implementation

pytestmark = pytest.mark.anyio
NO_LIMIT = Quota()
DAY = 1_780_000_000.0  # 2026-05-28 20:26 UTC


@pytest.fixture(params=KINDS)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[LedgerStore]:
    async with implementation(request, MemoryLedger, RedisLedger) as store:
        yield store


async def test_admit_holds_the_worst_case_until_settled(store: LedgerStore) -> None:
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


async def test_a_hold_grows_only_within_the_budget_and_renews_its_lease(
    store: LedgerStore,
) -> None:
    quota = Quota(micros_per_day=10_000)
    acct = f"x{id(store)}"
    assert (await store.admit(acct, "a", Hold(6_000, 6_000), quota, DAY, 60)).limit == ""
    assert (await store.admit(acct, "b", Hold(2_000, 2_000), quota, DAY, 60)).limit == ""
    assert not await store.extend(acct, "a", 9_000, quota, DAY, 60)  # 9 000 + 2 000 > 10 000
    assert await store.extend(acct, "a", 8_000, quota, DAY, 60)  # 8 000 + 2 000 fits
    refused = await store.admit(acct, "c", Hold(1, 1), quota, DAY, 60)
    assert refused.limit == "usd_per_day"  # the grown hold counts against the budget
    # A renewal keeps the hold past its first lease; b's lapses and frees its 2 000.
    assert await store.extend(acct, "a", 8_000, quota, DAY + 50, 60)
    assert (await store.admit(acct, "d", Hold(2_000, 2_000), quota, DAY + 70, 60)).limit == ""
    assert (await store.admit(acct, "e", Hold(1, 1), quota, DAY + 70, 60)).limit == "usd_per_day"
    # A settled ticket is not held again by a late renewal.
    await store.settle(acct, "a", 4_000, {"requests": 1}, DAY + 71)
    assert await store.extend(acct, "a", 8_000, quota, DAY + 72, 60)
    assert (await store.admit(acct, "f", Hold(4_000, 4_000), quota, DAY + 73, 60)).limit == ""


async def test_the_cheapest_plan_is_held_when_only_it_fits(store: LedgerStore) -> None:
    quota = Quota(micros_per_day=8_000)
    await store.admit("h", "a", Hold(6_000, 4_000), quota, DAY, 60)
    await store.settle("h", "a", 4_000, {"requests": 1}, DAY)
    admitted = await store.admit("h", "b", Hold(6_000, 4_000), quota, DAY, 60)
    assert admitted.limit == "" and admitted.held == 4_000  # 4 000 + 6 000 would not fit
    refused = await store.admit("h", "c", Hold(6_000, 4_000), quota, DAY, 60)
    assert refused.limit == "usd_per_day"  # 4 000 spent + 4 000 held: nothing else fits
    fresh = await store.admit("h2", "a", Hold(6_000, 4_000), quota, DAY, 60)
    assert fresh.held == 6_000


async def test_month_budget_spans_days_and_other_keys_are_apart(store: LedgerStore) -> None:
    quota = Quota(micros_per_month=5_000)
    await store.admit("m", "a", Hold(4_000, 4_000), quota, DAY, 60)
    await store.settle("m", "a", 4_000, {"requests": 1}, DAY)
    refused = await store.admit("m", "b", Hold(4_000, 4_000), quota, DAY + 86400, 60)
    assert refused.limit == "usd_per_month"
    assert (await store.admit("other", "b", Hold(4_000, 4_000), quota, DAY + 86400, 60)).limit == ""


async def test_requests_per_minute_bursts_then_spaces(store: LedgerStore) -> None:
    quota = Quota(requests_per_minute=3)
    for n in range(3):
        admitted = await store.admit("r", f"t{n}", Hold(0, 0), quota, DAY, 60)
        assert admitted.limit == ""
        await store.settle("r", f"t{n}", 0, {}, DAY)
    refused = await store.admit("r", "t3", Hold(0, 0), quota, DAY, 60)
    assert refused.limit == "requests_per_minute"
    assert refused.retry_after_s == pytest.approx(20, abs=0.01)  # one every 60/3 s
    assert (await store.admit("r", "t4", Hold(0, 0), quota, DAY + 20.01, 60)).limit == ""


async def test_concurrency_counts_leases_and_expired_leases_free(store: LedgerStore) -> None:
    quota = Quota(max_concurrent=2)
    assert (await store.admit("c", "a", Hold(0, 0), quota, DAY, 30)).limit == ""
    assert (await store.admit("c", "b", Hold(0, 0), quota, DAY, 30)).limit == ""
    assert (await store.admit("c", "c", Hold(0, 0), quota, DAY, 30)).limit == "max_concurrent"
    await store.settle("c", "a", 0, {}, DAY)
    assert (await store.admit("c", "c", Hold(0, 0), quota, DAY, 30)).limit == ""
    # A replica that died never settles: its lease runs out.
    assert (await store.admit("c", "d", Hold(0, 0), quota, DAY + 31, 30)).limit == ""


async def test_precheck_sees_what_admit_would_refuse_and_takes_nothing(
    store: LedgerStore,
) -> None:
    rated = Quota(requests_per_minute=2)
    for n in range(2):
        assert (await store.precheck("p", rated, DAY)).limit == ""
        assert (await store.admit("p", f"t{n}", Hold(0, 0), rated, DAY, 60)).limit == ""
    looked = await store.precheck("p", rated, DAY)
    assert looked.limit == "requests_per_minute"
    assert looked.retry_after_s == pytest.approx(30, abs=0.01)
    # Looking took nothing: the next admission is as early as without the looks.
    assert (await store.precheck("p", rated, DAY + 30.01)).limit == ""
    assert (await store.admit("p", "t2", Hold(0, 0), rated, DAY + 30.01, 60)).limit == ""
    capped = Quota(max_concurrent=1)
    assert (await store.admit("q", "a", Hold(0, 0), capped, DAY, 30)).limit == ""
    assert (await store.precheck("q", capped, DAY)).limit == "max_concurrent"
    assert (await store.precheck("q", capped, DAY + 31)).limit == ""  # the lease ran out
    await store.settle("q", "a", 0, {}, DAY)
    assert (await store.precheck("q", capped, DAY)).limit == ""
    assert (await store.precheck("q", NO_LIMIT, DAY)).limit == ""


async def test_ledger_lists_every_account(store: LedgerStore) -> None:
    day = Period.of(DAY).day
    for account in ("x", "y"):
        await store.admit(account, "t", Hold(0, 0), NO_LIMIT, DAY, 60)
        await store.settle(account, "t", 6_000, {"requests": 1, "images:replicate": 1}, DAY)
    ledger = await store.ledger(None, [day])
    assert {"x", "y"} <= set(ledger)
    assert ledger["y"][day]["images:replicate"] == 1


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


async def test_a_job_is_charged_once_in_the_same_step_as_the_ledger_entry(
    store: LedgerStore,
) -> None:
    # A claimant and the retry that took its claim over both follow one fal job: the first
    # settle charges it, the second does not, and a settle retried after a lost reply
    # charges nothing again. Charging is part of the settle itself: a replica killed
    # between "job marked billed" and "ledger entry" (two calls once) left the job marked
    # and uncharged, so the takeover's settle skipped it and the ledger missed a bill.
    acct, day = f"j{id(store)}", Period.of(DAY).day
    fal = JobCharge("fal:req-1", 4_000, (("micros:fal", 4_000),))
    spoiled = JobCharge(
        "replicate:p-1", 6_000, (("micros:replicate", 6_000), ("spoiled:replicate", 1))
    )
    assert await store.settle(acct, "claimant", 0, {"requests": 1}, DAY, [fal, spoiled]) == [
        True,
        True,
    ]
    assert await store.settle(acct, "takeover", 0, {"requests": 1}, DAY, [fal]) == [False]
    assert await store.settle(acct, "claimant", 0, {"requests": 1}, DAY, [fal, spoiled]) == [
        False,
        False,
    ]
    assert (await store.ledger([acct], [day]))[acct][day] == {
        "micros": 10_000,
        "requests": 2,
        "micros:fal": 4_000,
        "micros:replicate": 6_000,
        "spoiled:replicate": 1,
    }


async def test_a_settled_ticket_is_in_the_ledger_it_reads(store: LedgerStore) -> None:
    # What `unconfirmed` promises: 0 means `ledger` already shows every settle (the
    # resilient store counts what it keeps for Redis; tests/unit/test_resilient.py).
    assert store.unconfirmed() == 0
    await store.settle("acct-u", "t-u", 1234, {"micros:fal": 1234}, DAY)
    assert store.unconfirmed() == 0
    day = Period.of(DAY).day
    assert (await store.ledger(["acct-u"], [day]))["acct-u"][day]["micros:fal"] == 1234


async def test_a_burst_shares_a_bounded_pool_of_redis_connections(
    redis_server: RedisServer,
) -> None:
    # 400 admissions at once: each waits for one of the pool's connections (redis-py's own
    # pool failed every call past its 100th, which reads as Redis being down).
    store = RedisStore(redis_server.url, prefix=fresh())
    probe = connect(redis_server.url)
    before = (await probe.info("clients"))["connected_clients"]
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, (await probe.info("clients"))["connected_clients"] - before)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        quota = Quota(micros_per_day=10**9)
        # A lost wake-up in the pool would hang the burst: fail it instead, after a minute.
        results = await asyncio.wait_for(
            asyncio.gather(
                *(store.admit("burst", f"t{n}", Hold(1, 1), quota, DAY, 60) for n in range(400)),
                return_exceptions=True,
            ),
            60,
        )
    finally:
        watcher.cancel()
        await store.aclose()
        await probe.aclose()
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert all(r.limit == "" for r in results if not isinstance(r, BaseException))
    assert 0 < peak <= MAX_CONNECTIONS, peak
