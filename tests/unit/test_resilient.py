"""ResilientStore's unsettled spend (issue 11, item 8): what Redis has not confirmed is
kept, merged per (account, UTC day) past a bound, flushed at shutdown, and logged at ERROR
when it still cannot be written: never dropped.

The primary is a fake with the two methods the settling path uses: `settle` (idempotent per
ticket, like the SETTLE script) and `aclose`; while `down` it raises ConnectionError."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from gateway.state.base import Admission, Hold, JobCharge, Period, Policy, Quota
from gateway.state.resilient import ResilientStore

pytestmark = pytest.mark.anyio

DAY = 1_700_000_000.0  # 2023-11-14 UTC
NEXT = DAY + 86_400  # 2023-11-15 UTC


class FakeRedis:
    def __init__(self) -> None:
        self.down = True
        self.closed = False
        self.rows: dict[tuple[str, str], Counter[str]] = {}  # (account, day) -> ledger row
        self.tickets: set[str] = set()
        self.jobs: set[str] = set()
        self.calls = 0
        # Called after a settle landed, before its reply: may raise (the reply is lost).
        self.after_landing: Callable[[str], Any] | None = None

    async def settle(
        self,
        account: str,
        ticket: str,
        micros: int,
        counts: dict[str, int],
        now: float,
        jobs: Sequence[JobCharge] = (),
    ) -> list[bool]:
        self.calls += 1
        if self.down:
            raise ConnectionError("redis is down")
        if ticket in self.tickets:  # SET NX on the ticket: a repeat counts once
            return [False] * len(jobs)
        self.tickets.add(ticket)
        row = self.rows.setdefault((account, Period.of(now).day), Counter())
        row.update(counts)
        fresh = []
        for charge in jobs:  # SET NX on each job, in the same step
            new = charge.job not in self.jobs
            self.jobs.add(charge.job)
            if new:
                micros += charge.micros
                row.update(dict(charge.counts))
            fresh.append(new)
        row["micros"] += micros
        if self.after_landing is not None:
            await self.after_landing(ticket)
        return fresh

    async def aclose(self) -> None:
        self.closed = True


def resilient(fake: FakeRedis, retry_after_s: float = 0.01) -> ResilientStore:
    return ResilientStore(fake, retry_after_s=retry_after_s, money_timeout_s=0.2)  # type: ignore[arg-type]


def expected(settles: list[tuple[str, float, int]]) -> dict[tuple[str, str], Counter[str]]:
    rows: dict[tuple[str, str], Counter[str]] = {}
    for account, now, micros in settles:
        row = rows.setdefault((account, Period.of(now).day), Counter())
        row.update({"micros": micros, "requests": 1, "micros:fal": micros})
    return rows


async def settle_all(store: ResilientStore, settles: list[tuple[str, float, int]]) -> None:
    for n, (account, now, micros) in enumerate(settles):
        await store.settle(account, f"t{n}", micros, {"requests": 1, "micros:fal": micros}, now)


async def flushed(store: ResilientStore, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while store._unsettled:
        assert time.monotonic() < deadline, f"{len(store._unsettled)} settles still unsent"
        await asyncio.sleep(0.01)


SPREAD = [  # 3 accounts x 2 UTC days, 40 settles each, amounts all different
    (account, day + n, 1_000 + 7 * n + i)
    for i, account in enumerate(("a", "b", "c"))
    for day in (DAY, NEXT)
    for n in range(40)
]


async def test_past_the_bound_settles_merge_per_account_and_day_and_none_is_lost() -> None:
    fake = FakeRedis()
    store = resilient(fake)
    store.max_unsettled = 10
    try:
        await settle_all(store, SPREAD)
        # Memory: the first settle (sent once, so it keeps its ticket), then one aggregate
        # per (account, day), instead of 240 entries.
        assert len(store._unsettled) <= 1 + 6
        fake.down = False
        await flushed(store)
        assert fake.rows == expected(SPREAD)
    finally:
        await store.aclose()


async def test_a_reflush_that_had_landed_counts_once_and_nothing_merges_into_it() -> None:
    fake = FakeRedis()
    store = resilient(fake)
    store.max_unsettled = 1  # every settle past the first merges
    first = [("a", DAY + n, 500 + n) for n in range(30)]
    late = [("a", DAY + 100 + n, 900 + n) for n in range(20)]
    lost: set[str] = set()

    async def lose_reply(ticket: str) -> None:
        # The aggregate landed; settles arriving before its (lost) reply must not be folded
        # into it: its retry is a no-op, so they would vanish.
        if ticket.startswith("agg-") and not lost:
            lost.add(ticket)
            for n, (account, now, micros) in enumerate(late):
                await store.settle(
                    account, f"late{n}", micros, {"requests": 1, "micros:fal": micros}, now
                )
            raise ConnectionError("reply lost")

    try:
        await settle_all(store, first)
        assert len(store._unsettled) <= 2
        fake.after_landing = lose_reply
        fake.down = False
        await flushed(store)
        assert lost  # an aggregate was sent twice
        assert fake.rows == expected(first + late)
    finally:
        await store.aclose()


async def test_aclose_flushes_what_is_unsettled_before_closing() -> None:
    fake = FakeRedis()
    store = resilient(fake, retry_after_s=60)  # the settler would not try again in time
    settles = [("a", DAY + n, 4_000) for n in range(5)] + [("b", NEXT, 6_000)]
    await settle_all(store, settles)
    assert store.unconfirmed() == len(store._unsettled) > 0  # what /admin/spend counts
    fake.down = False
    await store.aclose()
    assert fake.rows == expected(settles)
    assert fake.closed and not store._unsettled and store.unconfirmed() == 0


async def test_what_cannot_reach_redis_at_shutdown_is_logged_for_replay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeRedis()
    store = resilient(fake)
    store.max_unsettled = 10
    store.close_flush_s = 0.3
    await settle_all(store, SPREAD)
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="gateway.state"):
        await store.aclose()
    assert time.monotonic() - started < 2.0 and fake.closed
    lines = [
        json.loads(r.getMessage())
        for r in caplog.records
        if r.levelno == logging.ERROR and r.getMessage().startswith("{")
    ]
    assert lines and all(line["event"] == "unsettled_spend" for line in lines)
    assert len(lines) <= 1 + 6  # one per (account, day), besides the first settle sent
    assert len({line["ticket"] for line in lines}) == len(lines)
    logged: dict[tuple[str, str], Counter[str]] = {}
    for line in lines:
        row = logged.setdefault((line["account"], line["day"]), Counter())
        row["micros"] += line["micros"]
        row.update(line["counts"])
    assert logged == expected(SPREAD)
    assert sum(line["settles"] for line in lines) == len(SPREAD)


class SlowRedis:
    """Answers admissions at once; its routing reads take longer than their timeout (as on
    a replica whose event loop is busy), or it refuses connections."""

    def __init__(self) -> None:
        self.admits = 0
        self.refusing = False

    async def snapshot(self, providers: list[str], now: float, policy: Policy) -> dict[str, Any]:
        if self.refusing:
            raise ConnectionError("connection refused")
        await asyncio.sleep(0.2)
        return {}

    async def admit(self, *args: Any) -> Admission:
        if self.refusing:
            raise ConnectionError("connection refused")
        self.admits += 1
        return Admission("", 0.0, 4_000)

    async def aclose(self) -> None:
        pass


async def test_a_slow_routing_read_does_not_refuse_budgets_for_a_second() -> None:
    fake = SlowRedis()
    store = ResilientStore(fake, timeout_s=0.05, money_timeout_s=1.0)  # type: ignore[arg-type]
    budget = Quota(micros_per_day=1_000_000)
    await store.snapshot(["fal"], DAY, Policy())  # times out: routing goes local a while
    admission = await store.admit("k", "t1", Hold(4_000, 4_000), budget, DAY, 60)
    assert admission.limit == "" and fake.admits == 1  # asked Redis, which answered
    fake.refusing = True  # Redis away for real: budgets fail closed at once
    await store.snapshot(["fal"], DAY, Policy())
    admission = await store.admit("k", "t2", Hold(4_000, 4_000), budget, DAY, 60)
    assert admission.limit == "state_store_unavailable"
    await store.aclose()


async def test_a_job_folded_into_an_aggregate_is_not_charged_again_by_its_takeover() -> None:
    # Past the backlog bound the claimant's settle of job J is folded into an aggregate,
    # which carries no job list (Redis gets no marker for J); the takeover on this replica
    # then settles J again. Only jobs this replica's view has not charged go on to Redis.
    fake = FakeRedis()
    store = resilient(fake)
    store.max_unsettled = 3
    job = JobCharge("fal:J", 4_000, (("micros:fal", 4_000),))
    for n in range(4):
        await store.settle("a", f"pre{n}", 0, {"requests": 1}, DAY + n, [])
    assert await store.settle("a", "claimant", 0, {"requests": 1}, DAY + 10, [job]) == [True]
    store._compact()
    assert await store.settle("a", "takeover", 0, {"requests": 1}, DAY + 11, [job]) == [False]
    fake.down = False
    await flushed(store)
    row = fake.rows[("a", Period.of(DAY).day)]
    assert row["micros"] == 4_000 and row["micros:fal"] == 4_000 and row["requests"] == 6
    await store.aclose()
