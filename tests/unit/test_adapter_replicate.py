from __future__ import annotations

import dataclasses
import re
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


def make(api: Any, **extra: object) -> ReplicateAdapter:
    settings = AdapterSettings(
        "replicate",
        "recraft-ai/recraft-crisp-upscale",
        BASE,
        "r8_tok",
        poll_initial_s=0.01,
        poll_max_s=0.02,
        extra=extra,
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


@pytest.mark.parametrize(("left", "sent"), [(3.2, 5), (7.4, 8)])
async def test_cancel_after_is_a_valid_duration_never_below_replicates_minimum(
    left: float, sent: int
) -> None:
    api = Api([DONE], create_status=201)
    await make(api).upscale(job(timeout=left))
    value = api.seen[0].headers["cancel-after"]
    # Replicate's duration syntax: digits with an s/m/h unit, units may combine (1h30m).
    assert re.fullmatch(r"(\d+h)?(\d+m)?(\d+s)?", value) and value
    # At least Replicate's 5 s; otherwise rounded up, so it never cuts our own deadline short.
    assert value == f"{sent}s"


class Delivery(Api):
    """An API whose outputs live on `output`, which answers 401 to a request without the
    token (Replicate's reference: delivery URLs may require it)."""

    def __init__(self, output: str, refusal: int = 401) -> None:
        super().__init__([prediction("succeeded", output=output)], create_status=201)
        self.output = output
        self.refusal = refusal

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if str(request.url) != self.output:
            return super().__call__(request)
        self.seen.append(request)
        if request.headers.get("authorization") != "Bearer r8_tok":
            return httpx.Response(self.refusal, json={"detail": "Unauthenticated"})
        return httpx.Response(200, content=b"WEBP", headers={"content-type": "image/webp"})


def downloads(api: Delivery) -> list[httpx.Request]:
    return [r for r in api.seen if str(r.url) == api.output]


@pytest.mark.parametrize(
    "output",
    [
        "https://replicate.delivery/xezq/abc/out.webp",
        "https://pbxt.replicate.delivery/abc/out.webp",
        "https://api.replicate.com/v1/files/f1/download",
    ],
)
@pytest.mark.parametrize("refusal", [401, 403])
async def test_a_delivery_url_that_needs_the_token_is_retried_once_with_it(
    output: str, refusal: int
) -> None:
    api = Delivery(output, refusal)
    result = await make(api).upscale(job())
    assert result.image == b"WEBP"
    first, second = downloads(api)
    assert "authorization" not in first.headers  # public first: the token only if it must
    assert second.headers["authorization"] == "Bearer r8_tok"


@pytest.mark.parametrize(
    "output",
    [
        "https://evil.test/out.webp",
        "https://replicate.delivery.evil.test/out.webp",
        "https://evilreplicate.delivery/out.webp",
        "http://replicate.delivery/xezq/abc/out.webp",  # the token never goes in clear text
    ],
)
async def test_the_token_never_goes_to_a_host_replicate_does_not_own(output: str) -> None:
    api = Delivery(output)
    with pytest.raises(ProviderBadResponse) as raised:
        await make(api).upscale(job())
    assert raised.value.upstream_status == 401
    assert [r.headers.get("authorization") for r in downloads(api)] == [None]


async def test_a_configured_delivery_host_may_get_the_token() -> None:
    api = Delivery("https://cdn.example.test/out.webp")
    adapter = make(api, delivery_token_hosts=["cdn.example.test"])
    assert (await adapter.upscale(job())).image == b"WEBP"
    assert [r.headers.get("authorization") for r in downloads(api)] == [None, "Bearer r8_tok"]
