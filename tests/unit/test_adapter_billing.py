"""What the fal adapter reports as billed, and that no job it gives up on is left running:
every way an attempt can end (success, a spoiled output, a fault while polling, the caller
cancelled mid-submit or mid-poll, a cancel that only signals) against a scripted queue
(httpx.MockTransport); and the fakes both adapters' billing tests share (the Replicate ones
are in tests/unit/test_replicate_billing.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from adapters.base import (
    AdapterSettings,
    ProviderBadResponse,
    ProviderTimeout,
    ProviderUnavailable,
    UpscaleJob,
)
from adapters.fal import FalAdapter

pytestmark = pytest.mark.anyio
FAL = "http://queue.test"
REQ = f"{FAL}/fal-ai/recraft/requests/r1"
REP = "http://api.test"
PRED = f"{REP}/v1/predictions/p1"


class Recorder:
    """A Billing that records what the adapter reports."""

    def __init__(self) -> None:
        self.jobs: list[tuple[str, str]] = []
        self.tasks: list[asyncio.Future[Any]] = []

    def billed(self, provider: str, job_id: str) -> None:
        self.jobs.append((provider, job_id))

    def pending(self, task: asyncio.Future[Any]) -> None:
        self.tasks.append(task)

    async def settle(self) -> None:
        await asyncio.gather(*self.tasks, return_exceptions=True)


def job(billing: Recorder, timeout: float = 5.0) -> UpscaleJob:
    return UpscaleJob(b"\x89PNG", 32, 32, time.monotonic() + timeout, "req", billing=billing)


def settings(name: str, base: str) -> AdapterSettings:
    return AdapterSettings(name, "m/x", base, "key", poll_initial_s=0.01, poll_max_s=0.02)


def submitted() -> httpx.Response:
    """fal's answer to a submit: job r1 and its queue URLs."""
    return httpx.Response(
        200,
        json={
            "request_id": "r1",
            "status_url": f"{REQ}/status",
            "response_url": REQ,
            "cancel_url": f"{REQ}/cancel",
        },
    )


class FalQueue:
    """A fal queue whose job runs `pending` polls, then completes (or was cancelled)."""

    def __init__(self, pending: int = 1, fault: str = "", submit_delay: float = 0.0) -> None:
        self.pending = pending
        self.fault = fault
        self.submit_delay = submit_delay
        self.cancelled = False
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        self.seen.append((request.method, url))
        if request.method == "POST":
            await asyncio.sleep(self.submit_delay)
            if self.fault == "malformed_submit":
                return httpx.Response(200, content=b'{"request_id": "r1", "sta')
            return submitted()
        if request.method == "PUT":
            if self.pending > 0:
                self.cancelled = True
                return httpx.Response(202, json={"status": "CANCELLATION_REQUESTED"})
            return httpx.Response(400, json={"status": "ALREADY_COMPLETED"})
        if url.endswith("/status"):
            if self.cancelled:
                return httpx.Response(200, json={"status": "COMPLETED"})
            if self.fault == "status_500" and not any(m == "PUT" for m, _ in self.seen):
                return httpx.Response(500, json={"detail": "boom"})
            if self.pending > 0:
                self.pending -= 1
                return httpx.Response(202, json={"status": "IN_PROGRESS"})
            return httpx.Response(200, json={"status": "COMPLETED"})
        if url == REQ:
            if self.fault == "start_timeout":  # X-Fal-Request-Timeout passed in the queue
                return httpx.Response(
                    504,
                    json={"detail": "Request timed out", "error_type": "request_timeout"},
                    headers={
                        "X-Fal-Error-Type": "request_timeout",
                        "X-Fal-Request-Timeout-Type": "user",
                        "X-Fal-Retryable": "false",
                    },
                )
            if self.cancelled:
                return httpx.Response(400, json={"detail": "Request was cancelled"})
            return httpx.Response(200, json={"image": {"url": "http://cdn.test/o.png"}})
        if url == "http://cdn.test/o.png":
            if self.fault == "truncated":
                return httpx.Response(200, content=b"\x89PN")
            return httpx.Response(200, content=b"OUT", headers={"content-type": "image/png"})
        return httpx.Response(404)


def fal(queue: FalQueue) -> FalAdapter:
    return FalAdapter(settings("fal", FAL), httpx.AsyncClient(transport=httpx.MockTransport(queue)))


async def test_fal_a_served_job_is_billed_once() -> None:
    billing = Recorder()
    result = await fal(FalQueue()).upscale(job(billing))
    assert result.image == b"OUT" and billing.jobs == [("fal", "r1")]


async def test_fal_a_job_that_never_started_in_time_ended_unbilled() -> None:
    # fal's documented start timeout: 504 with X-Fal-Request-Timeout-Type: user. It is the
    # job's own end, not fal's trouble: not billed, and nothing left to follow or cancel.
    billing, queue = Recorder(), FalQueue(pending=0, fault="start_timeout")
    started = time.monotonic()
    with pytest.raises(ProviderTimeout):
        await fal(queue).upscale(job(billing))
    await billing.settle()
    assert billing.jobs == [] and not any(m == "PUT" for m, _ in queue.seen)
    assert time.monotonic() - started < 2


async def test_fal_a_fault_while_polling_cancels_the_job_and_confirms_its_end() -> None:
    billing, queue = Recorder(), FalQueue(pending=100, fault="status_500")
    adapter = fal(queue)
    with pytest.raises(ProviderUnavailable):
        await adapter.upscale(job(billing))
    await billing.settle()
    assert ("PUT", f"{REQ}/cancel") in queue.seen and queue.cancelled
    assert billing.jobs == []  # cancelled before it ran out: fal bills nothing


async def test_fal_a_job_that_finished_before_the_cancel_landed_is_billed() -> None:
    billing, queue = Recorder(), FalQueue(pending=1)

    async def hold_the_result(request: httpx.Request) -> httpx.Response:
        if str(request.url) == REQ and request.method == "GET" and not billing.tasks:
            await asyncio.sleep(10)  # the caller gives up while the result is on its way
        return await queue(request)

    adapter = FalAdapter(
        settings("fal", FAL), httpx.AsyncClient(transport=httpx.MockTransport(hold_the_result))
    )
    attempt = asyncio.ensure_future(adapter.upscale(job(billing)))
    await asyncio.sleep(0.3)
    attempt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attempt
    await billing.settle()
    assert ("PUT", f"{REQ}/cancel") in queue.seen  # answered ALREADY_COMPLETED
    assert billing.jobs == [("fal", "r1")]


async def test_fal_a_cancel_during_submit_still_cancels_the_job_it_started() -> None:
    billing, queue = Recorder(), FalQueue(pending=100, submit_delay=0.3)
    attempt = asyncio.ensure_future(fal(queue).upscale(job(billing)))
    await asyncio.sleep(0.1)
    attempt.cancel()  # the submit is in flight: no request id yet
    with pytest.raises(asyncio.CancelledError):
        await attempt
    await billing.settle()
    assert ("PUT", f"{REQ}/cancel") in queue.seen and billing.jobs == []


async def test_fal_spoiled_jobs_are_billed() -> None:
    billing = Recorder()  # a truncated file: billed; the image check then refuses it
    assert (await fal(FalQueue(fault="truncated")).upscale(job(billing))).image == b"\x89PN"
    assert billing.jobs == [("fal", "r1")]
    unreadable = Recorder()  # a 2xx submit we cannot read: the job runs, and bills
    with pytest.raises(ProviderBadResponse):
        await fal(FalQueue(fault="malformed_submit")).upscale(job(unreadable))
    assert len(unreadable.jobs) == 1 and unreadable.jobs[0][0] == "fal"


async def test_fal_an_infrastructure_error_on_the_result_is_followed_not_taken_as_failure() -> None:
    billing, queue = Recorder(), FalQueue(pending=0)
    answered = []

    async def flaky_result(request: httpx.Request) -> httpx.Response:
        if str(request.url) == REQ and not answered:  # the job succeeded; fal stumbles once
            answered.append(1)
            return httpx.Response(503, json={"detail": "x"}, headers={"x-fal-error-type": "e"})
        return await queue(request)

    adapter = FalAdapter(
        settings("fal", FAL), httpx.AsyncClient(transport=httpx.MockTransport(flaky_result))
    )
    with pytest.raises(ProviderUnavailable):
        await adapter.upscale(job(billing))
    await billing.settle()
    assert billing.jobs == [("fal", "r1")]  # followed to its end: it had succeeded


async def test_fal_a_follow_up_that_cannot_learn_the_end_still_bills(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("adapters.wire.CONFIRM_S", 1.0)
    billing = Recorder()

    async def hung(request: httpx.Request) -> httpx.Response:
        follow_up = request.method == "PUT" or str(request.url).endswith("/status")
        if follow_up and billing.tasks:  # the follow-up: fal no longer answers
            await asyncio.sleep(30)
        return await FalQueue(pending=100)(request)

    adapter = FalAdapter(
        settings("fal", FAL), httpx.AsyncClient(transport=httpx.MockTransport(hung))
    )
    with pytest.raises(ProviderTimeout):
        await adapter.upscale(job(billing, timeout=0.3))
    await billing.settle()
    assert billing.jobs == [("fal", "r1")]  # counted: the ledger may overstate, never miss


async def test_fal_a_cancel_that_only_signals_a_job_that_then_completes_is_billed_once() -> None:
    billing, seen = Recorder(), []
    completes = False

    async def queue(request: httpx.Request) -> httpx.Response:
        nonlocal completes
        url = str(request.url)
        seen.append((request.method, url))
        if request.method == "POST":
            return submitted()
        if request.method == "PUT":  # accepted, but the running job finishes regardless
            completes = True
            return httpx.Response(202, json={"status": "CANCELLATION_REQUESTED"})
        if url == f"{REQ}/status":
            if completes and sum(1 for m, u in seen if u == url) > 3:
                return httpx.Response(200, json={"status": "COMPLETED"})
            return httpx.Response(202, json={"status": "IN_PROGRESS"})
        if url == REQ:
            return httpx.Response(200, json={"image": {"url": "http://cdn.test/o.png"}})
        return httpx.Response(404)

    adapter = FalAdapter(
        settings("fal", FAL), httpx.AsyncClient(transport=httpx.MockTransport(queue))
    )
    with pytest.raises(ProviderTimeout):
        await adapter.upscale(job(billing, timeout=0.3))
    await billing.settle()
    await adapter.aclose()
    assert ("PUT", f"{REQ}/cancel") in seen and ("GET", REQ) in seen
    assert billing.jobs == [("fal", "r1")]


async def test_fal_a_job_whose_result_says_cancelled_is_not_billed_and_is_retryable() -> None:
    billing, queue = Recorder(), FalQueue(pending=0)
    queue.cancelled = True  # someone else cancelled it: its result URL says so

    adapter = fal(queue)
    with pytest.raises(ProviderUnavailable) as raised:
        await adapter.upscale(job(billing))
    await billing.settle()
    assert raised.value.retryable and raised.value.upstream_status == 400
    assert billing.jobs == []
    assert not any(m == "PUT" for m, _ in queue.seen)  # it has ended: nothing to cancel
