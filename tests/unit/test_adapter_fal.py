from __future__ import annotations

import dataclasses
import time

import httpx
import orjson
import pytest

from adapters.base import (
    AdapterSettings,
    ProviderBadResponse,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    UpscaleJob,
)
from adapters.fal import FalAdapter

pytestmark = pytest.mark.anyio
BASE = "http://queue.test"
REQ = f"{BASE}/fal-ai/recraft/requests/r1"


def job(timeout: float = 5.0, **options: object) -> UpscaleJob:
    return UpscaleJob(b"\x89PNG-bytes", 32, 32, time.monotonic() + timeout, "req", options)


def make(handler: httpx.MockTransport) -> FalAdapter:
    settings = AdapterSettings(
        "fal", "fal-ai/recraft/upscale/crisp", BASE, "k-123", poll_initial_s=0.01, poll_max_s=0.02
    )
    return FalAdapter(settings, httpx.AsyncClient(transport=handler))


class Queue:
    """A scripted fal queue: records every request."""

    def __init__(
        self,
        pending: int = 1,
        submit: httpx.Response | None = None,
        status_url: str = f"{REQ}/status",
    ) -> None:
        self.pending = pending
        self.submit = submit
        self.status_url = status_url
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        url = str(request.url)
        if request.method == "POST":
            return self.submit or httpx.Response(
                200,
                json={
                    "request_id": "r1",
                    "status_url": self.status_url,
                    "response_url": REQ,
                    "cancel_url": f"{REQ}/cancel",
                },
            )
        cancelled = any(r.method == "PUT" for r in self.seen)
        if url == f"{REQ}/status":
            if self.pending > 0 and not cancelled:
                self.pending -= 1
                return httpx.Response(
                    202, json={"status": "IN_PROGRESS", "queue_position": None, "logs": None}
                )
            return httpx.Response(
                200, json={"status": "COMPLETED", "queue_position": None, "logs": None}
            )
        if url == REQ:
            if cancelled:
                return httpx.Response(400, json={"detail": "Request was cancelled"})
            return httpx.Response(
                200, json={"image": {"url": "http://cdn.test/out.png", "content_type": "image/png"}}
            )
        if url == "http://cdn.test/out.png":
            return httpx.Response(200, content=b"OUTPUT", headers={"content-type": "image/png"})
        if url == f"{REQ}/cancel":
            return httpx.Response(202, json={"status": "CANCELLATION_REQUESTED"})
        return httpx.Response(404, json={"detail": "not found"})


async def test_queue_protocol_end_to_end() -> None:
    queue = Queue(pending=2)
    adapter = make(httpx.MockTransport(queue))
    result = await adapter.upscale(job(sync_mode=True, enable_safety_checker=False))
    assert result.image == b"OUTPUT" and result.provider_job_id == "r1"
    submit = queue.seen[0]
    assert submit.url == f"{BASE}/fal-ai/recraft/upscale/crisp"
    assert submit.headers["authorization"] == "Key k-123"
    assert 1 <= int(submit.headers["x-fal-request-timeout"]) <= 5
    body = orjson.loads(submit.content)
    assert body["image_url"].startswith("data:image/png;base64,")
    assert body["sync_mode"] is True and body["enable_safety_checker"] is False
    cdn = [r for r in queue.seen if r.url.host == "cdn.test"]
    assert cdn and "authorization" not in cdn[0].headers  # the key never leaves the queue host


async def test_unset_options_are_not_sent() -> None:
    queue = Queue(pending=0)
    await make(httpx.MockTransport(queue)).upscale(job(sync_mode=None))
    assert set(orjson.loads(queue.seen[0].content)) == {"image_url"}


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (httpx.Response(500, json={"detail": "boom"}), ProviderUnavailable),
        (
            httpx.Response(
                503, json={"detail": "runner", "error_type": "runner_scheduling_failure"}
            ),
            ProviderUnavailable,
        ),
        (
            httpx.Response(504, json={"detail": "t", "error_type": "request_timeout"}),
            ProviderTimeout,
        ),
        (
            httpx.Response(429, json={"detail": "slow"}, headers={"retry-after": "3"}),
            ProviderRateLimited,
        ),
        (
            httpx.Response(
                422, json={"detail": [{"loc": ["body", "image_url"], "msg": "bad", "type": "x"}]}
            ),
            ProviderRejected,
        ),
        (httpx.Response(401, json={"detail": "no"}), ProviderUnavailable),
        (httpx.Response(200, content=b"{not json"), ProviderBadResponse),
        (httpx.Response(200, json={"request_id": "r1"}), ProviderBadResponse),
    ],
)
async def test_submit_errors_map_onto_the_taxonomy(response: httpx.Response, error: type) -> None:
    with pytest.raises(error) as raised:
        await make(httpx.MockTransport(Queue(submit=response))).upscale(job())
    if isinstance(raised.value, ProviderRateLimited):
        assert raised.value.retry_after == 3


async def test_queue_urls_off_the_queue_host_are_refused() -> None:
    queue = Queue(status_url="http://evil.test/steal")
    with pytest.raises(ProviderBadResponse):
        await make(httpx.MockTransport(queue)).upscale(job())
    assert all(r.url.host != "evil.test" for r in queue.seen)


async def test_deadline_cancels_the_job() -> None:
    queue = Queue(pending=10_000)
    adapter = make(httpx.MockTransport(queue))
    with pytest.raises(ProviderTimeout):
        await adapter.upscale(job(timeout=0.2))
    await adapter.aclose()
    assert any(r.method == "PUT" and str(r.url) == f"{REQ}/cancel" for r in queue.seen)


async def test_connect_error_is_retryable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    with pytest.raises(ProviderUnavailable) as raised:
        await make(httpx.MockTransport(refuse)).upscale(job())
    assert raised.value.retryable


async def test_failed_job_result_and_empty_image() -> None:
    class Failing(Queue):
        def __call__(self, request: httpx.Request) -> httpx.Response:
            if str(request.url) == REQ:
                return httpx.Response(200, json={"image": None})
            return super().__call__(request)

    with pytest.raises(ProviderBadResponse):
        await make(httpx.MockTransport(Failing(pending=0))).upscale(job())


async def test_a_submitted_job_is_journaled_and_a_resumed_one_is_followed() -> None:
    noted: list[tuple[str, dict[str, str]]] = []

    async def note(provider: str, handle: dict[str, str]) -> bool:
        noted.append((provider, handle))
        return True

    queue = Queue()
    first = await make(httpx.MockTransport(queue)).upscale(
        dataclasses.replace(job(), on_submitted=note)
    )
    assert first.image == b"OUTPUT"
    ((provider, handle),) = noted
    assert provider == "fal" and handle["request_id"] == "r1"
    assert handle["status_url"] == f"{REQ}/status"

    again = Queue()
    resumed = await make(httpx.MockTransport(again)).upscale(
        dataclasses.replace(job(), resume=(("fal", handle),), on_submitted=note)
    )
    assert resumed.image == b"OUTPUT" and len(noted) == 1
    assert all(r.method != "POST" for r in again.seen)  # nothing submitted, nothing billed
    # Another provider's handle is not this adapter's to follow.
    other = Queue()
    await make(httpx.MockTransport(other)).upscale(
        dataclasses.replace(job(), resume=(("replicate", {"get": "x"}),))
    )
    assert other.seen[0].method == "POST"


async def test_a_resume_handle_off_the_queue_host_is_refused() -> None:
    queue = Queue()
    handle = {
        "request_id": "r1",
        "status_url": "http://evil.test/status",
        "response_url": REQ,
        "cancel_url": f"{REQ}/cancel",
    }
    with pytest.raises(ProviderBadResponse):
        await make(httpx.MockTransport(queue)).upscale(
            dataclasses.replace(job(), resume=(("fal", handle),))
        )
    assert queue.seen == []  # the key never left for the other host
