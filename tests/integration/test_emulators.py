"""The emulators speak the providers' protocols as documented: checked directly over real
sockets, since every other test trusts them."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from adapters.emulators import (
    BackgroundServer,
    EmulatorConfig,
    FaultScript,
    create_fal_app,
    create_replicate_app,
)
from tests.conftest import make_image

KEY = "emu-key"
FAL_APP = "fal-ai/recraft/upscale/crisp"
REP_MODEL = "recraft-ai/recraft-crisp-upscale"


def uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def fal() -> Iterator[httpx.Client]:
    config = EmulatorConfig(api_key=KEY, faults=FaultScript(latency_ms=150, jitter_ms=0))
    with BackgroundServer(create_fal_app(config)) as server:
        yield httpx.Client(base_url=server.url, headers={"Authorization": f"Key {KEY}"}, timeout=10)


@pytest.fixture(scope="module")
def replicate() -> Iterator[httpx.Client]:
    config = EmulatorConfig(api_key=KEY, faults=FaultScript(latency_ms=150, jitter_ms=0))
    with BackgroundServer(create_replicate_app(config)) as server:
        yield httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10
        )


@pytest.fixture(autouse=True)
def reset(request: pytest.FixtureRequest) -> None:
    for name in ("fal", "replicate"):
        if name in request.fixturenames:
            client = request.getfixturevalue(name)
            client.put("/_emulator/faults", json={"latency_ms": 150, "jitter_ms": 0})
            client.delete("/_emulator/requests")


def settle(client: httpx.Client, status_url: str, done: tuple[str, ...] = ("COMPLETED",)) -> dict:
    """Poll until the job ends (image work shares two cores with everything else)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        body = client.get(status_url).json()
        if body["status"] in done:
            return body
        time.sleep(0.05)
    raise AssertionError(f"job did not finish: {body}")


def test_fal_queue_round_trip(fal: httpx.Client) -> None:
    submitted = fal.post(f"/{FAL_APP}", json={"image_url": uri(make_image(100, 50))})
    assert submitted.status_code == 200
    body = submitted.json()
    assert set(body) >= {"request_id", "status_url", "response_url", "cancel_url"}
    assert f"/fal-ai/recraft/requests/{body['request_id']}" in body["response_url"]
    first = fal.get(body["status_url"])
    assert first.status_code == 202 and first.json()["status"] in ("IN_QUEUE", "IN_PROGRESS")
    assert {"queue_position", "logs"} <= set(first.json()) and first.json()["logs"] is None
    assert fal.get(body["response_url"]).status_code == 400  # still in progress
    settle(fal, body["status_url"])
    done = fal.get(body["status_url"])
    assert done.status_code == 200 and done.json()["status"] == "COMPLETED"
    assert done.json()["logs"] is None and 0 < done.json()["metrics"]["inference_time"] < 10
    for flag in ("1", "true"):  # the REST docs' logs=1, and fal_client's logs=true
        logs = fal.get(body["status_url"], params={"logs": flag}).json()["logs"]
        assert logs and all({"message", "level", "source", "timestamp"} <= set(e) for e in logs)
    assert fal.get(body["status_url"], params={"logs": "false"}).json()["logs"] is None
    image = fal.get(body["response_url"]).json()["image"]
    assert (image["width"], image["height"]) == (400, 200)
    file = httpx.get(image["url"])  # the CDN needs no key
    assert Image.open(io.BytesIO(file.content)).size == (400, 200)
    assert fal.put(body["cancel_url"]).json() == {"status": "ALREADY_COMPLETED"}


def test_fal_sync_mode_cancel_and_cap(fal: httpx.Client) -> None:
    body = fal.post(
        f"/{FAL_APP}", json={"image_url": uri(make_image(2000, 1000)), "sync_mode": True}
    ).json()
    settle(fal, body["status_url"])
    url = fal.get(body["response_url"]).json()["image"]["url"]
    data = base64.b64decode(url.split(",", 1)[1])
    assert Image.open(io.BytesIO(data)).size == (4096, 2048)  # long side capped at 4096
    queued = fal.post(f"/{FAL_APP}", json={"image_url": uri(make_image())}).json()
    cancelled = fal.put(queued["cancel_url"])
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "CANCELLATION_REQUESTED"


def test_fal_cancel_removes_a_queued_job_but_only_signals_a_running_one(
    fal: httpx.Client,
) -> None:
    fal.put("/_emulator/faults", json={"latency_ms": 1500, "jitter_ms": 0})  # 0.45 s queued
    queued = fal.post(f"/{FAL_APP}", json={"image_url": uri(make_image())}).json()
    running = fal.post(f"/{FAL_APP}", json={"image_url": uri(make_image())}).json()
    assert fal.put(queued["cancel_url"]).status_code == 202
    settle(fal, running["status_url"], ("IN_PROGRESS",))
    signalled = fal.put(running["cancel_url"])
    assert signalled.status_code == 202 and signalled.json()["status"] == "CANCELLATION_REQUESTED"
    assert fal.get(running["status_url"]).json()["status"] == "IN_PROGRESS"  # it runs on
    settle(fal, running["status_url"])
    assert fal.get(running["response_url"]).json()["image"]["width"] == 256
    cancelled = fal.get(queued["response_url"])
    assert cancelled.status_code == 400 and cancelled.headers["x-fal-retryable"] == "false"
    jobs = {j["id"]: j for j in fal.get("/_emulator/jobs").json()["jobs"]}
    assert jobs[queued["request_id"]]["state"] == "canceled"
    assert not jobs[queued["request_id"]]["billed"]
    assert jobs[running["request_id"]]["state"] == "succeeded"
    assert jobs[running["request_id"]]["billed"]  # finished after the cancel: billed
    assert fal.get("/_emulator/stats").json()["cancel_requested"] >= 1


def test_fal_errors_and_recording(fal: httpx.Client) -> None:
    unauth = httpx.post(f"{fal.base_url}/{FAL_APP}", json={"image_url": "x"})
    assert unauth.status_code == 401 and unauth.headers["x-fal-retryable"] == "false"
    assert fal.post("/fal-ai/other", json={}).status_code == 404
    invalid = fal.post(f"/{FAL_APP}", json={"sync_mode": True})
    assert invalid.status_code == 422 and invalid.headers["x-fal-retryable"] == "false"
    assert invalid.json()["detail"] == [
        {
            "loc": ["body", "image_url"],
            "msg": "field required",
            "type": "missing",
            "url": "https://docs.fal.ai/errors#missing",
        }
    ]
    bad_bool = fal.post(f"/{FAL_APP}", json={"image_url": "x", "sync_mode": "maybe"})
    assert bad_bool.status_code == 422
    fal.put("/_emulator/faults", json={"error_rate": 1, "error_status": 503})
    down = fal.post(f"/{FAL_APP}", json={"image_url": "x"})
    assert (
        down.status_code == 503 and down.headers["x-fal-error-type"] == "runner_scheduling_failure"
    )
    assert down.json()["error_type"] == "runner_scheduling_failure"
    assert down.headers["x-fal-retryable"] == "true"
    fal.put("/_emulator/faults", json={"rate_limit_rate": 1, "retry_after_s": 7})
    limited = fal.post(f"/{FAL_APP}", json={"image_url": "x"})
    assert limited.status_code == 429 and limited.headers["retry-after"] == "7"
    assert limited.headers["x-fal-retryable"] == "true"
    recorded = fal.get("/_emulator/requests").text
    assert KEY not in recorded and "base64" not in recorded


def test_fal_model_failures(fal: httpx.Client) -> None:
    fal.put("/_emulator/faults", json={"latency_ms": 0, "jitter_ms": 0, "content_policy_rate": 1})
    body = fal.post(f"/{FAL_APP}", json={"image_url": uri(make_image())}).json()
    assert settle(fal, body["status_url"])["error_type"] == "content_policy_violation"
    result = fal.get(body["response_url"])
    assert (
        result.status_code == 422
        and result.json()["detail"][0]["type"] == "content_policy_violation"
    )
    refusal = result.json()["detail"][0]
    assert refusal["url"] == "https://docs.fal.ai/errors#content_policy_violation"
    assert result.headers["x-fal-retryable"] == "false"
    fal.put("/_emulator/faults", json={"latency_ms": 0, "jitter_ms": 0})
    body = fal.post(f"/{FAL_APP}", json={"image_url": uri(b"not an image")}).json()
    settle(fal, body["status_url"])
    assert fal.get(body["response_url"]).status_code == 422


def test_replicate_wait_poll_and_delivery(replicate: httpx.Client) -> None:
    path = f"/v1/models/{REP_MODEL}/predictions"
    quick = replicate.post(
        path, json={"input": {"image": uri(make_image(64, 64))}}, headers={"Prefer": "wait=5"}
    )
    assert quick.status_code == 201 and quick.json()["status"] == "succeeded"
    output = quick.json()["output"]
    img = Image.open(io.BytesIO(httpx.get(output).content))
    assert img.format == "WEBP" and img.size == (256, 256)
    assert quick.json()["metrics"]["predict_time"] >= 0
    started = replicate.post(path, json={"input": {"image": uri(make_image())}})
    assert started.status_code == 202 and started.json()["status"] == "starting"
    polled = settle(replicate, started.json()["urls"]["get"], ("succeeded", "failed"))
    assert polled["status"] == "succeeded" and polled["output"]


def test_replicate_cancel_abort_files_and_errors(replicate: httpx.Client) -> None:
    path = f"/v1/models/{REP_MODEL}/predictions"
    running = replicate.post(path, json={"input": {"image": uri(make_image())}}).json()
    assert replicate.post(running["urls"]["cancel"]).json()["status"] == "canceled"
    # Cancel-After below Replicate's 5 s minimum is refused (deadlines that abort or cancel
    # are in tests/conformance/test_replicate_client.py, which can afford the 5 s).
    too_short = replicate.post(
        path, json={"input": {"image": uri(make_image())}}, headers={"Cancel-After": "100ms"}
    )
    assert too_short.status_code == 422 and "Cancel-After" in too_short.json()["detail"]
    assert too_short.headers["content-type"].startswith("application/problem+json")
    replicate.put("/_emulator/faults", json={"latency_ms": 0, "jitter_ms": 0})
    upload = replicate.post("/v1/files", files={"content": ("a.png", make_image(), "image/png")})
    assert upload.status_code == 201 and upload.json()["checksums"]["sha256"]
    created = replicate.post(
        path, json={"input": {"image": upload.json()["urls"]["get"]}}, headers={"Prefer": "wait=5"}
    )
    assert created.json()["status"] == "succeeded"
    unauth = httpx.post(f"{replicate.base_url}{path}", json={"input": {}})
    assert unauth.status_code == 401 and unauth.json()["title"] == "Unauthenticated"
    assert unauth.headers["content-type"].startswith("application/problem+json")
    missing = replicate.post(path, json={"input": {}})
    assert missing.status_code == 422 and missing.json()["invalid_fields"]
    unknown = replicate.post("/v1/models/a/b/predictions", json={"input": {"image": "x"}})
    assert unknown.status_code == 404 and "title" not in unknown.json()
    replicate.put("/_emulator/faults", json={"error_rate": 1, "error_status": 402})
    billing = replicate.post(path, json={"input": {"image": "x"}})
    assert billing.status_code == 402 and billing.json()["title"] == "Payment Required"
    replicate.put("/_emulator/faults", json={"latency_ms": 0, "job_failure_rate": 1})
    failed = replicate.post(
        path, json={"input": {"image": uri(make_image())}}, headers={"Prefer": "wait=5"}
    ).json()
    assert failed["status"] == "failed" and failed["error"]
    assert KEY not in replicate.get("/_emulator/requests").text


def test_replicate_delivery_token_and_retry_after_switches() -> None:
    config = EmulatorConfig(
        api_key=KEY,
        delivery_requires_token=True,
        replicate_retry_after_header=True,
        faults=FaultScript(latency_ms=0, jitter_ms=0),
    )
    auth = {"Authorization": f"Bearer {KEY}"}
    with (
        BackgroundServer(create_replicate_app(config)) as server,
        httpx.Client(base_url=server.url, timeout=10) as http,
    ):
        path = f"/v1/models/{REP_MODEL}/predictions"
        done = http.post(path, json={"input": {"image": uri(make_image())}}, headers=auth).json()
        assert done["status"] == "succeeded"
        anonymous = http.get(done["output"])
        assert anonymous.status_code == 401 and anonymous.json()["title"] == "Unauthenticated"
        wrong = http.get(done["output"], headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401
        delivered = http.get(done["output"], headers=auth)
        assert delivered.status_code == 200 and delivered.headers["content-type"] == "image/webp"
        http.put("/_emulator/faults", json={"rate_limit_rate": 1, "retry_after_s": 7})
        throttled = http.post(path, json={"input": {"image": "x"}}, headers=auth)
        assert throttled.status_code == 429 and throttled.headers["retry-after"] == "7"
        assert throttled.json()["detail"].endswith("resets in ~7s.")
