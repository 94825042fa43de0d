"""JSON bodies naming the image by URL: fetched with size and time bounds (this gateway's
config allows loopback http, so the image server can live on this machine), and the
abandoned provider job is cancelled when a provider is too slow."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from adapters.emulators import BackgroundServer
from tests.conftest import make_image
from tests.integration.conftest import Emulator, own_gateway
from tests.integration.servers import GatewayProcess

MODEL = "recraft-crisp-upscale"


async def image(request: Request) -> Response:
    return Response(make_image(50, 40, fmt="JPEG"), media_type="image/jpeg")


async def big(request: Request) -> Response:
    return Response(b"\xff\xd8\xff" + b"\0" * (11 * 1024 * 1024), media_type="image/jpeg")


async def slow(request: Request) -> Response:
    await asyncio.sleep(30)
    return Response(b"")


async def redirect(request: Request) -> Response:
    return RedirectResponse("/image.jpg", status_code=302)


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    app = Starlette(
        routes=[
            Route("/image.jpg", image),
            Route("/big", big),
            Route("/slow", slow),
            Route("/redirect", redirect),
        ]
    )
    with BackgroundServer(app) as server:
        yield server.url


@pytest.fixture(scope="module")
def open_gateway(
    tmp_path_factory: pytest.TempPathFactory, fal_emulator: Emulator, replicate_emulator: Emulator
) -> Iterator[GatewayProcess]:
    fetch = {"allow_http": True, "allow_private_networks": True, "timeout_s": 2}
    with own_gateway(tmp_path_factory, fal_emulator, replicate_emulator, fetch=fetch) as process:
        yield process


def edit(gateway: GatewayProcess, image_ref: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/images/edits",
        timeout=60,
        json={"model": MODEL, "image": image_ref, "scale_factor": 2, "response_format": "b64_json"},
    )


def test_url_is_fetched_and_redirects_followed(
    open_gateway: GatewayProcess, image_server: str, emulators: object
) -> None:
    for path in ("/image.jpg", "/redirect"):
        response = edit(open_gateway, f"{image_server}{path}")
        assert response.status_code == 200, response.text
        assert response.json()["size"] == "100x80"


def test_url_fetch_is_bounded(
    open_gateway: GatewayProcess, image_server: str, emulators: object
) -> None:
    assert edit(open_gateway, f"{image_server}/big").status_code == 413
    started = time.monotonic()
    response = edit(open_gateway, f"{image_server}/slow")
    assert response.status_code == 400 and response.json()["error"]["code"] == "image_fetch_failed"
    assert time.monotonic() - started < 10
    missing = edit(open_gateway, f"{image_server}/nothing")
    assert missing.status_code == 400 and "404" in missing.json()["error"]["message"]


def test_slow_provider_job_is_cancelled_then_next_serves(
    gateway: GatewayProcess, emulators: tuple[Emulator, Emulator]
) -> None:
    fal, _ = emulators
    # Starts within X-Fal-Request-Timeout (30 % of the time is queueing), then runs past
    # fal's 3 s attempt budget: the gateway must ask fal to cancel it. A running fal job
    # only gets the signal and may finish and bill anyway: the ledger check after the test
    # (tests/integration/reconcile.py) holds the gateway to counting it if it does.
    fal.faults(latency_ms=6_000, jitter_ms=0)
    before = httpx.get(f"{fal.url}/_emulator/stats").json().get("cancel_requested", 0)
    response = httpx.post(
        f"{gateway.url}/v1/images/edits",
        timeout=60,
        files={"image": ("a.png", make_image(40, 40), "image/png")},
        data={"model": MODEL, "scale_factor": "2"},
    )
    assert response.status_code == 200
    assert response.headers["x-upscale-attempts"] == "fal=ProviderTimeout,replicate=ok"
    deadline = time.monotonic() + 5
    while httpx.get(f"{fal.url}/_emulator/stats").json().get("cancel_requested", 0) == before:
        assert time.monotonic() < deadline, "the abandoned fal job was never cancelled"
        time.sleep(0.05)
