"""Accounts on the in-process store: admission, refusals as OpenAI-shaped 429s, settling
what was charged (also when the request fails), and the ledger's shape."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from gateway.accounts import Accounts, Bill, day_row
from gateway.config import ClientsConfig
from gateway.errors import QuotaExceeded, RateLimited
from gateway.metrics import Metrics
from gateway.routing.spend import SERVED, SPOILED
from gateway.state.base import Period, days_back
from gateway.state.memory import MemoryStore

pytestmark = pytest.mark.anyio


def accounts(**limits: object) -> tuple[Accounts, MemoryStore]:
    store = MemoryStore()
    config = ClientsConfig.model_validate(
        {"keys": {"team": {"sha256": "0" * 64, **limits}}, "defaults": {"usd_per_day": 1}}
    )
    return Accounts(store, config, lease_s=60, metrics=Metrics()), store


def charge(bill: Bill, provider: str, usd: float, job_id: str = "") -> None:
    """A job the provider billed for the image served, reported as an adapter reports it."""
    attempt = bill.spend.attempt(usd)
    attempt.fate = SERVED
    attempt.billed(provider, job_id or secrets.token_hex(4))


async def test_a_request_is_settled_with_what_was_charged() -> None:
    accts, _ = accounts(usd_per_day=0.01)
    async with accts.admitted("team", 0.006, 0.004) as bill:
        assert not bill.cheapest_only
        charge(bill, "fal", 0.004)
        bill.served("fal")
    seen = await accts.usage("team", 1)
    assert seen["today"]["spend_usd"] == 0.004 and seen["today"]["requests"] == 1
    assert seen["today"]["by_provider"] == {"fal": {"spend_usd": 0.004, "images": 1}}


async def test_a_failed_request_still_pays_its_charges_and_counts_as_failed() -> None:
    accts, _ = accounts()
    with pytest.raises(RuntimeError):
        async with accts.admitted("team", 0.006, 0.004) as bill:
            charge(bill, "replicate", 0.006)
            raise RuntimeError("results could not be stored")
    today = (await accts.usage("team", 1))["today"]
    assert today["spend_usd"] == 0.006 and today["failed"] == 1 and today["requests"] == 0


async def test_budget_refusal_names_the_limit_and_when_it_resets() -> None:
    accts, _ = accounts(usd_per_day=0.005)
    async with accts.admitted("team", 0.006, 0.004) as bill:  # only the cheapest plan fits
        assert bill.cheapest_only
        charge(bill, "fal", 0.004)
    with pytest.raises(QuotaExceeded) as err:
        async with accts.admitted("team", 0.006, 0.004):
            pass
    assert err.value.status == 429 and err.value.code == "insufficient_quota"
    assert "daily budget of 0.005 USD" in err.value.message and "00:00 UTC" in err.value.message
    assert 1 <= int(err.value.headers["retry-after"]) <= 86400
    assert err.value.should_retry is False


async def test_rate_refusal_says_when_to_retry() -> None:
    accts, _ = accounts(requests_per_minute=1)
    async with accts.admitted("team", 0, 0):
        pass
    with pytest.raises(RateLimited) as err:
        async with accts.admitted("team", 0, 0):
            pass
    assert err.value.headers["retry-after"] == "60"
    assert 59_000 < int(err.value.headers["retry-after-ms"]) <= 60_000
    assert "1 requests per minute" in err.value.message


async def test_unnamed_keys_take_the_defaults() -> None:
    accts, _ = accounts()
    assert accts.limits("key_0123456789ab").usd_per_day == 1
    assert accts.limits("team").usd_per_day is None


def test_day_row_groups_providers_and_converts_micros() -> None:
    row = {"micros": 10_000, "micros:fal": 4_000, "micros:replicate": 6_000, "images:fal": 1}
    shown = day_row(row)
    assert shown["spend_usd"] == 0.01 and shown["requests"] == 0
    assert shown["by_provider"]["replicate"] == {"spend_usd": 0.006, "images": 0}


def test_periods_roll_over_at_utc_midnight_and_month_end() -> None:
    last = Period.of(1798761599.5)  # 2026-12-31 23:59:59.5 UTC
    assert (last.day, last.month) == ("2026-12-31", "2026-12")
    assert last.day_left_s == pytest.approx(0.5) and last.month_left_s == pytest.approx(0.5)
    assert Period.of(1798761600.0).month == "2027-01"
    assert days_back(1798761600.0, 2) == ["2027-01-01", "2026-12-31"]


async def test_a_job_is_charged_once_even_when_two_requests_followed_it() -> None:
    accts, _ = accounts()
    async with accts.admitted("team", 0.004, 0.004) as bill:  # the claimant
        charge(bill, "fal", 0.004, "job-1")
        charge(bill, "fal", 0.004, "job-1")  # seen billed twice (poll, then cancel answer)
    async with accts.admitted("team", 0.004, 0.004) as bill:  # the one that took it over
        charge(bill, "fal", 0.004, "job-1")
    today = (await accts.usage("team", 1))["today"]
    assert today["spend_usd"] == 0.004 and today["requests"] == 2


async def test_a_bill_waits_for_abandoned_jobs_and_marks_them() -> None:
    accts, _ = accounts(usd_per_day=0.01)
    release = asyncio.Event()
    async with accts.admitted("team", 0.010, 0.004) as bill:
        charge(bill, "replicate", 0.006)
        loser = bill.spend.attempt(0.004)  # a hedge's loser: cancelled, still confirming

        async def confirm() -> None:
            await release.wait()
            loser.billed("fal", "late-job")  # it had finished before the cancel landed

        bill.spend.pending(asyncio.ensure_future(confirm()))
    # Answered already; the lease still holds what the loser may cost.
    with pytest.raises(QuotaExceeded):
        async with accts.admitted("team", 0.004, 0.004):
            pass
    release.set()
    await accts.drain()
    today = (await accts.usage("team", 1))["today"]
    assert today["spend_usd"] == 0.01
    assert today["by_provider"]["fal"] == {"spend_usd": 0.004, "images": 0, "abandoned": 1}


async def test_a_failover_after_a_billed_job_grows_the_hold_or_is_refused() -> None:
    """A request holds what its first plan may cost (0.006). Its fal job bills and proves
    spoiled (0.004); failing over to Replicate (0.006) would bill 0.010 in all. The hold
    grows to that if the budget still has room beside the other holds, else the failover is
    refused: spent plus held never passes the budget."""
    accts, _ = accounts(usd_per_day=0.010)
    async with accts.admitted("team", 0.006, 0.004) as bill:
        spoiled = bill.spend.attempt(0.004)
        spoiled.billed("fal", "j1")
        spoiled.fate = SPOILED
        await bill.spend.allow(0.006)  # room: the hold becomes 0.010
        assert bill.held == 10_000
        charge(bill, "replicate", 0.006)
    assert (await accts.usage("team", 1))["today"]["spend_usd"] == 0.010

    accts, _ = accounts(usd_per_day=0.010)
    other = accts.admitted("team", 0.004, 0.004)  # another request holds 0.004
    async with other, accts.admitted("team", 0.006, 0.004) as bill:
        spoiled = bill.spend.attempt(0.004)
        spoiled.billed("fal", "j2")
        spoiled.fate = SPOILED
        with pytest.raises(QuotaExceeded):
            await bill.spend.allow(0.006)  # 0.004 + 0.004 + 0.006 > 0.010
        assert bill.held == 6_000
