"""What the Replicate adapter reports as billed, and that no prediction it gives up on is
left running: every way an attempt can end (success, a spoiled output, a fault while
polling, a cancel mid-create or mid-poll, a prediction canceled while running) against a
scripted API (httpx.MockTransport). Shared fakes: tests/unit/test_adapter_billing.py."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import httpx
import pytest

from adapters.base import ProviderBadResponse, ProviderTimeout, ProviderUnavailable
from adapters.replicate import ReplicateAdapter
from tests.unit.test_adapter_billing import PRED, REP, Recorder, job, settings

pytestmark = pytest.mark.anyio


class Predictions:
    """A Replicate API whose prediction runs `pending` polls, then succeeds."""

    def __init__(self, pending: int = 1, fault: str = "", create_delay: float = 0.0) -> None:
        self.pending = pending
        self.fault = fault
        self.create_delay = create_delay
        self.status = "starting"
        self.seen: list[httpx.Request] = []

    def prediction(self) -> dict[str, Any]:
        output = "http://delivery.test/o.webp" if self.status == "succeeded" else None
        if self.fault == "no_output":
            output = None
        return {
            "id": "p1",
            "status": self.status,
            "output": output,
            "urls": {"get": PRED, "cancel": f"{PRED}/cancel"},
        }

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        url = str(request.url)
        if request.method == "POST" and url.endswith("/predictions"):
            await asyncio.sleep(self.create_delay)
            if self.fault == "malformed_create":
                return httpx.Response(201, content=b'{"id": "p1", "stat')
            return httpx.Response(201, json=self.prediction())
        if url == f"{PRED}/cancel":
            if self.status not in ("succeeded", "failed"):
                self.status = "canceled"
            return httpx.Response(200, json=self.prediction())
        if url == PRED:
            if self.fault == "poll_500" and self.status == "starting":
                return httpx.Response(500, json={"detail": "boom", "status": 500})
            if self.fault == "poll_malformed" and self.status == "starting":
                return httpx.Response(200, content=b"<html>")
            if self.status == "starting":
                if self.pending > 0:
                    self.pending -= 1
                else:
                    self.status = "succeeded"
            return httpx.Response(200, json=self.prediction())
        if url == "http://delivery.test/o.webp":
            return httpx.Response(200, content=b"WEBP")
        return httpx.Response(404)


def replicate(api: Predictions) -> ReplicateAdapter:
    client = httpx.AsyncClient(transport=httpx.MockTransport(api))
    return ReplicateAdapter(settings("replicate", REP), client)


async def test_replicate_creates_without_waiting_and_bills_a_served_prediction() -> None:
    billing, api = Recorder(), Predictions()
    assert (await replicate(api).upscale(job(billing))).image == b"WEBP"
    assert "prefer" not in api.seen[0].headers  # the id comes back at once, cancellable
    assert billing.jobs == [("replicate", "p1")]


@pytest.mark.parametrize("fault", ["poll_500", "poll_malformed"])
async def test_replicate_a_fault_while_polling_cancels_the_prediction(fault: str) -> None:
    billing, api = Recorder(), Predictions(pending=100, fault=fault)
    with pytest.raises((ProviderUnavailable, ProviderBadResponse)):
        await replicate(api).upscale(job(billing))
    await billing.settle()
    assert api.status == "canceled" and billing.jobs == []


async def test_replicate_a_cancel_during_create_still_cancels_the_prediction() -> None:
    billing, api = Recorder(), Predictions(pending=100, create_delay=0.3)
    attempt = asyncio.ensure_future(replicate(api).upscale(job(billing)))
    await asyncio.sleep(0.1)
    attempt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attempt
    await billing.settle()
    assert api.status == "canceled" and billing.jobs == []


async def test_replicate_a_prediction_that_finished_before_the_cancel_is_billed() -> None:
    billing, api = Recorder(), Predictions(pending=0)

    async def slow_delivery(request: httpx.Request) -> httpx.Response:
        if request.url.host == "delivery.test":
            await asyncio.sleep(10)
        return await api(request)

    client = httpx.AsyncClient(transport=httpx.MockTransport(slow_delivery))
    attempt = asyncio.ensure_future(
        ReplicateAdapter(settings("replicate", REP), client).upscale(job(billing))
    )
    await asyncio.sleep(0.3)  # succeeded, its output downloading
    attempt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attempt
    await billing.settle()
    assert billing.jobs == [("replicate", "p1")]


@pytest.mark.parametrize("fault", ["no_output", "malformed_create"])
async def test_replicate_spoiled_predictions_are_billed(fault: str) -> None:
    billing = Recorder()
    with pytest.raises(ProviderBadResponse):
        await replicate(Predictions(pending=0, fault=fault)).upscale(job(billing))
    assert len(billing.jobs) == 1 and billing.jobs[0][0] == "replicate"


async def test_replicate_a_resumed_prediction_is_billed_by_its_follower() -> None:
    billing, api = Recorder(), Predictions(pending=0)
    resumed = dataclasses.replace(job(billing), resume=(("replicate", {"id": "p1", "get": PRED}),))
    assert (await replicate(api).upscale(resumed)).image == b"WEBP"
    assert billing.jobs == [("replicate", "p1")]
    assert not any(r.method == "POST" for r in api.seen)


async def test_replicate_a_resumed_prediction_abandoned_is_billed_under_its_id() -> None:
    billing, api = Recorder(), Predictions(pending=0)

    async def slow_get(request: httpx.Request) -> httpx.Response:
        if str(request.url) == PRED and not billing.tasks:
            await asyncio.sleep(10)  # given up before its first answer
        return await api(request)

    client = httpx.AsyncClient(transport=httpx.MockTransport(slow_get))
    handle = {"id": "p1", "get": PRED, "cancel": f"{PRED}/cancel"}
    resumed = dataclasses.replace(job(billing), resume=(("replicate", handle),))
    attempt = asyncio.ensure_future(
        ReplicateAdapter(settings("replicate", REP), client).upscale(resumed)
    )
    await asyncio.sleep(0.2)
    api.status = "succeeded"  # it finishes as it is given up on
    attempt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attempt
    await billing.settle()
    assert billing.jobs == [("replicate", "p1")]  # under its id, as its first owner billed it


STARTED = "2025-01-01T00:00:01.000000Z"


class Running(Predictions):
    """A prediction that starts running on its first poll (`started_at` set) and runs
    `pending` polls; `canceled_by` "other" has it canceled by someone else meanwhile."""

    def __init__(self, pending: int = 100, canceled_by: str = "") -> None:
        super().__init__(pending=pending)
        self.canceled_by = canceled_by
        self.started_at: str | None = None

    def prediction(self) -> dict[str, Any]:
        return {**super().prediction(), "started_at": self.started_at}

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if str(request.url) == PRED and self.status == "starting":
            self.status, self.started_at = "processing", STARTED
        elif str(request.url) == PRED and self.status == "processing":
            if self.canceled_by == "other":
                self.status = "canceled"  # a stalled run of this request gave up on it
            elif self.pending > 0:
                self.pending -= 1
            else:
                self.status = "succeeded"
            self.seen.append(request)
            return httpx.Response(200, json=self.prediction())
        return await super().__call__(request)


async def test_replicate_a_prediction_canceled_while_running_is_billed_when_polled() -> None:
    billing, api = Recorder(), Running(canceled_by="other")
    with pytest.raises(ProviderUnavailable):
        await replicate(api).upscale(job(billing))
    await billing.settle()
    assert api.status == "canceled" and api.started_at is not None
    assert billing.jobs == [("replicate", "p1")]  # once: it ran, Replicate bills it
    assert not any(str(r.url).endswith("/cancel") for r in api.seen)  # it had ended


async def test_replicate_a_running_prediction_abandoned_and_canceled_is_billed_once() -> None:
    billing, api = Recorder(), Running()
    adapter = replicate(api)
    with pytest.raises(ProviderTimeout):
        await adapter.upscale(job(billing, timeout=0.3))
    await billing.settle()
    await adapter.aclose()
    assert api.status == "canceled" and api.started_at is not None
    assert billing.jobs == [("replicate", "p1")]


async def test_replicate_a_prediction_canceled_before_it_started_is_not_billed() -> None:
    billing, api = Recorder(), Predictions(pending=100, fault="poll_500")
    with pytest.raises(ProviderUnavailable):
        await replicate(api).upscale(job(billing))
    await billing.settle()
    assert api.status == "canceled" and "started_at" not in api.prediction()
    assert billing.jobs == []


@pytest.mark.parametrize("started_at", [None, STARTED])
async def test_replicate_an_aborted_prediction_is_never_billed(started_at: str | None) -> None:
    billing = Recorder()
    aborted = {
        "id": "p1",
        "status": "aborted",
        "started_at": started_at,
        "urls": {"get": PRED, "cancel": f"{PRED}/cancel"},
    }

    def api(request: httpx.Request) -> httpx.Response:
        return httpx.Response(201 if request.method == "POST" else 200, json=aborted)

    client = httpx.AsyncClient(transport=httpx.MockTransport(api))
    with pytest.raises(ProviderTimeout):
        await ReplicateAdapter(settings("replicate", REP), client).upscale(job(billing))
    await billing.settle()
    assert billing.jobs == []
