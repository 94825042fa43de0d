from __future__ import annotations

import dataclasses
import time
from typing import Any

import httpx
import orjson
import pytest

from adapters.base import (
    AdapterSettings,
    ProviderBadResponse,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    UpscaleJob,
)
from adapters.replicate import ReplicateAdapter

pytestmark = pytest.mark.anyio
BASE = "http://api.test"
GET = f"{BASE}/v1/predictions/p1"


def job(image: bytes = b"\x89PNG-bytes", timeout: float = 5.0) -> UpscaleJob:
    return UpscaleJob(image, 32, 32, time.monotonic() + timeout, "req", {"sync_mode": True})


def make(api: Any) -> ReplicateAdapter:
    settings = AdapterSettings(
        "replicate",
        "recraft-ai/recraft-crisp-upscale",
        BASE,
        "r8_tok",
        poll_initial_s=0.01,
        poll_max_s=0.02,
    )
    return ReplicateAdapter(settings, httpx.AsyncClient(transport=httpx.MockTransport(api)))


def prediction(status: str, **extra: object) -> dict[str, object]:
    return {
        "id": "p1",
        "status": status,
        "output": None,
        "error": None,
        "urls": {"get": GET, "cancel": f"{GET}/cancel"},
        **extra,
    }


class Api:
    def __init__(self, statuses: list[dict[str, object]], create_status: int = 202) -> None:
        self.statuses = statuses
        self.create_status = create_status
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        url = str(request.url)
        if request.method == "POST" and url.endswith("/predictions"):
            return httpx.Response(self.create_status, json=self.statuses.pop(0))
        if request.method == "POST" and url == f"{BASE}/v1/files":
            return httpx.Response(201, json={"id": "f1", "urls": {"get": f"{BASE}/v1/files/f1"}})
        if request.method == "GET" and url == GET:
            if any(str(r.url).endswith("/cancel") for r in self.seen):
                return httpx.Response(200, json=prediction("canceled"))  # it took the cancel
            return httpx.Response(
                200, json=self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
            )
        if url == "http://delivery.test/out.webp":
            return httpx.Response(200, content=b"WEBP", headers={"content-type": "image/webp"})
        if url.endswith("/cancel") or request.method == "DELETE":
            return httpx.Response(200, json=prediction("canceled"))
        return httpx.Response(404, json={"detail": "Not found.", "status": 404})


DONE = prediction(
    "succeeded", output="http://delivery.test/out.webp", metrics={"predict_time": 1.5}
)


async def test_create_then_polls_and_downloads() -> None:
    api = Api([prediction("starting"), prediction("processing"), DONE])
    result = await make(api).upscale(job())
    assert result.image == b"WEBP" and result.content_type == "image/webp"
    assert result.predict_seconds == 1.5
    create = api.seen[0]
    assert create.url == f"{BASE}/v1/models/recraft-ai/recraft-crisp-upscale/predictions"
    assert create.headers["authorization"] == "Bearer r8_tok"
    assert "prefer" not in create.headers  # never waits: its id must come back at once
    assert create.headers["cancel-after"] == "5s"  # Replicate's minimum, never below
    body = orjson.loads(create.content)
    assert list(body["input"]) == ["image"]  # fal-only flags never reach Replicate
    assert body["input"]["image"].startswith("data:image/png;base64,")
    delivery = [r for r in api.seen if r.url.host == "delivery.test"]
    assert "authorization" not in delivery[0].headers


async def test_done_at_create_is_not_polled() -> None:
    api = Api([DONE], create_status=201)
    await make(api).upscale(job())
    assert not any(str(r.url) == GET for r in api.seen)


async def test_large_input_goes_through_the_files_api() -> None:
    api = Api([DONE], create_status=201)
    await make(api).upscale(job(image=b"x" * (300 * 1024)))
    assert api.seen[0].url == f"{BASE}/v1/files"
    assert b'name="content"' in api.seen[0].content
    create = next(r for r in api.seen if str(r.url).endswith("/predictions"))
    assert orjson.loads(create.content)["input"]["image"] == f"{BASE}/v1/files/f1"


@pytest.mark.parametrize(
    ("final", "error"),
    [
        (prediction("aborted"), ProviderTimeout),
        (prediction("canceled"), ProviderUnavailable),
        (prediction("failed", error="CUDA out of memory"), ProviderBadResponse),
        (prediction("failed", error="NSFW content detected"), ProviderRejected),
        (prediction("succeeded", output=None), ProviderBadResponse),
        (prediction("succeeded", output=[]), ProviderBadResponse),
    ],
)
async def test_terminal_statuses(final: dict[str, object], error: type) -> None:
    with pytest.raises(error):
        await make(Api([prediction("starting"), final])).upscale(job())


@pytest.mark.parametrize("status", [402, 401, 500])
async def test_problem_json_errors(status: int) -> None:
    def api(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            status,
            json={"title": "t", "detail": "d", "status": status},
            headers={"content-type": "application/problem+json"},
        )

    with pytest.raises(ProviderUnavailable):
        await make(api).upscale(job())


async def test_deadline_cancels_the_prediction() -> None:
    api = Api([prediction("starting"), prediction("processing")])
    adapter = make(api)
    with pytest.raises(ProviderTimeout):
        await adapter.upscale(job(timeout=0.3))
    await adapter.aclose()
    assert any(r.method == "POST" and str(r.url) == f"{GET}/cancel" for r in api.seen)


async def test_a_created_prediction_is_journaled_and_a_resumed_one_is_followed() -> None:
    noted: list[tuple[str, dict[str, str]]] = []

    async def note(provider: str, handle: dict[str, str]) -> bool:
        noted.append((provider, handle))
        return True

    journaled = Api([prediction("starting"), DONE])
    await make(journaled).upscale(dataclasses.replace(job(), on_submitted=note))
    assert noted == [("replicate", {"id": "p1", "get": GET, "cancel": f"{GET}/cancel"})]
    # Created without waiting on the output, so the prediction is journaled at once.
    assert "prefer" not in journaled.seen[0].headers
    api = Api([prediction("processing"), DONE])
    result = await make(api).upscale(dataclasses.replace(job(), resume=(noted[0],)))
    assert result.image == b"WEBP"
    assert not any(r.method == "POST" for r in api.seen)  # no second prediction
    with pytest.raises(ProviderBadResponse):
        await make(Api([DONE])).upscale(
            dataclasses.replace(job(), resume=(("replicate", {"get": "http://evil.test/p"}),))
        )
