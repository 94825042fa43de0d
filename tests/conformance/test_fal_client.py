"""The official fal-client 1.0.3 against the fal emulator, over TLS and real sockets: each
test asserts what the client parsed (its Status classes, logs, metrics, errors, the image)
as it would parse it from queue.fal.run. The client runs as shipped: only its documented
environment (FAL_QUEUE_RUN_HOST, FAL_KEY, SSL_CERT_FILE) points it here (see fal_tls.py)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
from PIL import Image

from adapters.emulators import EmulatorConfig, FaultScript
from tests.conformance.fal_tls import APP, FAL_KEY, FalTLS, serve_fal_tls
from tests.conftest import make_image

# 30 % of a job's service time is spent queued, the rest in progress: long enough for the
# client's 0.1 s polls to see both, short enough to keep the module quick.
LATENCY = {"latency_ms": 800, "jitter_ms": 0}
LOG_KEYS = {"message", "level", "source", "timestamp"}
ERRORS_DOC = "https://docs.fal.ai/errors#"


@pytest.fixture(scope="module")
def fal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FalTLS]:
    config = EmulatorConfig(api_key=FAL_KEY, faults=FaultScript(**LATENCY))
    with serve_fal_tls(tmp_path_factory.mktemp("fal-tls"), config) as served:
        yield served


@pytest.fixture(autouse=True)
def reset(fal: FalTLS) -> None:
    fal.faults(**LATENCY)
    fal.admin.delete("/_emulator/requests").raise_for_status()


def png_input(fal: FalTLS, width: int, height: int) -> dict[str, str]:
    return {"image_url": fal.client.encode(make_image(width, height), "image/png")}


def auth() -> dict[str, str]:
    return {"Authorization": f"Key {FAL_KEY}"}


def check_image(fal: FalTLS, result: dict[str, Any], size: tuple[int, int]) -> None:
    """The result's image as fal documents it, and its file (fetched over TLS) is that image."""
    image = result["image"]
    assert image["content_type"] == "image/png"
    assert (image["width"], image["height"]) == size
    assert image["url"].startswith(f"{fal.url}/files/") and image["file_name"]
    data = httpx.get(image["url"], verify=fal.ssl_context, timeout=10).content
    assert len(data) == image["file_size"]
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "PNG" and decoded.size == size


def check_logs(logs: Any) -> list[dict[str, Any]]:
    assert isinstance(logs, list) and logs, logs
    for entry in logs:
        assert set(entry) >= LOG_KEYS, entry
        assert isinstance(entry["message"], str) and entry["message"]
        datetime.fromisoformat(entry["timestamp"])
    return logs


def check_completed(fal: FalTLS, status: Any) -> None:
    assert isinstance(status, fal.client.Completed), status
    check_logs(status.logs)
    inference_time = status.metrics["inference_time"]
    assert isinstance(inference_time, float) and 0 < inference_time < 10
    assert status.error is None and status.error_type is None


def job_end(fal: FalTLS, request_id: str, timeout: float = 10) -> dict[str, Any]:
    """The emulator's record of a job once it ended (its state and whether it billed)."""
    deadline = time.monotonic() + timeout
    while True:
        job = fal.jobs()[request_id]
        if job["state"] not in ("queued", "running"):
            return job
        assert time.monotonic() < deadline, f"job {request_id} did not end: {job}"
        time.sleep(0.05)


@contextlib.contextmanager
def sync_client(fal: FalTLS, key: str) -> Iterator[Any]:
    """A SyncClient of its own (another key); its pooled httpx client is closed after."""
    client = fal.client.SyncClient(key=key)
    try:
        yield client
    finally:
        pooled = client.__dict__.get("_client")
        if isinstance(pooled, httpx.Client):
            pooled.close()


def test_submit_status_and_result(fal: FalTLS) -> None:
    c = fal.client
    handle = c.submit(
        APP, png_input(fal, 100, 50), hint="runner-7", priority="low", start_timeout=30
    )
    assert isinstance(handle, c.SyncRequestHandle)
    assert handle.response_url == f"{fal.url}/fal-ai/recraft/requests/{handle.request_id}"
    assert handle.status_url == f"{handle.response_url}/status"
    assert handle.cancel_url == f"{handle.response_url}/cancel"
    (submitted,) = fal.requests()
    assert submitted["auth_ok"] and submitted["path"] == f"/{APP}"
    assert submitted["headers"]["x-fal-runner-hint"] == "runner-7"
    assert submitted["headers"]["x-fal-queue-priority"] == "low"
    assert submitted["headers"]["x-fal-request-timeout"] == "30.0"
    assert handle.request_id in fal.jobs()

    first = handle.status(with_logs=True)  # fal_client sends logs=true
    assert isinstance(first, (c.Queued, c.InProgress)), first
    if isinstance(first, c.Queued):
        assert first.position == 0
    events = [first, *handle.iter_events(with_logs=True, interval=0.05)]
    running = [e for e in events if isinstance(e, c.InProgress)]
    assert running, events
    for status in running:
        assert isinstance(status.logs, list)
    check_completed(fal, events[-1])
    assert [type(e) for e in events].count(c.Completed) == 1

    plain = handle.status()  # logs=false: fal answers logs null
    assert isinstance(plain, c.Completed) and plain.logs is None
    assert plain.metrics["inference_time"] == events[-1].metrics["inference_time"]
    result = handle.get()
    check_image(fal, result, (400, 200))
    job = job_end(fal, handle.request_id)
    assert job["state"] == "succeeded" and job["billed"]


def test_subscribe_reports_queue_updates(fal: FalTLS) -> None:
    c = fal.client
    fal.faults(latency_ms=1500, jitter_ms=0)  # 0.45 s queued: the first poll sees it
    enqueued: list[str] = []
    updates: list[Any] = []
    result = c.subscribe(
        APP,
        png_input(fal, 64, 48),
        with_logs=True,
        on_enqueue=enqueued.append,
        on_queue_update=updates.append,
        interval=0.05,
    )
    check_image(fal, result, (256, 192))
    (request_id,) = enqueued
    kinds = [type(u) for u in updates]
    assert kinds[0] is c.Queued and updates[0].position == 0
    assert c.InProgress in kinds and kinds.count(c.Completed) == 1 and kinds[-1] is c.Completed
    # Once in progress, never queued again.
    assert c.Queued not in kinds[kinds.index(c.InProgress) :]
    for update in updates:
        if isinstance(update, c.InProgress):
            assert isinstance(update.logs, list)
    check_completed(fal, updates[-1])
    messages = [entry["message"] for entry in updates[-1].logs]
    assert any("256x192" in m for m in messages), messages
    job = job_end(fal, request_id)
    assert job["state"] == "succeeded" and job["billed"]


def test_handles_rebuilt_from_a_request_id(fal: FalTLS) -> None:
    c = fal.client
    submitted = c.submit(APP, png_input(fal, 40, 32))
    rebuilt = c.sync_client.get_handle(APP, submitted.request_id)
    # The client rebuilds the queue URLs from FAL_QUEUE_RUN_HOST and the app's owner/alias:
    # they must be the ones the emulator handed out.
    urls = ("response_url", "status_url", "cancel_url")
    assert [getattr(rebuilt, u) for u in urls] == [getattr(submitted, u) for u in urls]
    with httpx.Client(headers=auth(), verify=fal.ssl_context, timeout=10) as own:
        handle = c.SyncRequestHandle.from_request_id(own, APP, submitted.request_id)
        assert handle.status_url == submitted.status_url
        status = handle.status(with_logs=True)
        assert isinstance(status, (c.Queued, c.InProgress, c.Completed))
        check_image(fal, handle.get(interval=0.05), (160, 128))
    done = c.status(APP, submitted.request_id, with_logs=True)
    check_completed(fal, done)
    check_image(fal, c.result(APP, submitted.request_id), (160, 128))


def test_submit_async_and_iter_events(fal: FalTLS) -> None:
    c = fal.client

    async def scenario() -> tuple[str, list[Any], dict[str, Any], Any]:
        client = c.AsyncClient()  # key from FAL_KEY, like the module-level functions
        # AsyncClient has no close(): its pooled httpx client is closed by hand, inside the
        # loop it belongs to.
        pooled = await client._client
        try:
            handle = await client.submit(APP, png_input(fal, 50, 50))
            assert isinstance(handle, c.AsyncRequestHandle)
            events = [e async for e in handle.iter_events(with_logs=True, interval=0.05)]
            result = await handle.get()
            status = await client.status(APP, handle.request_id, with_logs=True)
            return handle.request_id, events, result, status
        finally:
            await pooled.aclose()

    request_id, events, result, status = asyncio.run(scenario())
    assert any(isinstance(e, c.InProgress) and isinstance(e.logs, list) for e in events)
    check_completed(fal, events[-1])
    check_completed(fal, status)
    check_image(fal, result, (200, 200))
    assert job_end(fal, request_id)["billed"]


def test_cancel_of_a_queued_job_cancels_it_unbilled(fal: FalTLS) -> None:
    c = fal.client
    fal.faults(latency_ms=4000, jitter_ms=0)  # 1.2 s in the queue
    handle = c.submit(APP, png_input(fal, 40, 40))
    assert isinstance(handle.status(), c.Queued)
    handle.cancel()  # 202 CANCELLATION_REQUESTED: the client returns quietly
    done = handle.status(with_logs=True)
    assert isinstance(done, c.Completed)
    with pytest.raises(c.FalClientHTTPError) as err:
        handle.get()
    assert err.value.status_code == 400 and "cancel" in err.value.message.lower()
    with pytest.raises(c.FalClientHTTPError) as again:
        handle.cancel()
    assert again.value.status_code == 400 and "ALREADY_COMPLETED" in again.value.message
    job = job_end(fal, handle.request_id)
    assert job["state"] == "canceled" and not job["billed"]


def test_cancel_of_a_running_job_only_signals_it(fal: FalTLS) -> None:
    """fal sends a running job's runner a cancellation signal; the job may run on to its
    end, and then it is billed."""
    c = fal.client
    fal.faults(latency_ms=1500, jitter_ms=0)
    handle = c.submit(APP, png_input(fal, 40, 40))
    status = None
    for status in handle.iter_events(interval=0.05):
        if not isinstance(status, c.Queued):
            break
    assert isinstance(status, c.InProgress), status
    handle.cancel()  # accepted
    raw = fal.admin.put(handle.cancel_url, headers=auth())
    assert raw.status_code == 202 and raw.json() == {"status": "CANCELLATION_REQUESTED"}
    still = handle.status(with_logs=True)
    assert isinstance(still, c.InProgress)
    assert any("cancel" in entry["message"].lower() for entry in check_logs(still.logs))
    check_image(fal, handle.get(interval=0.05), (160, 160))
    job = job_end(fal, handle.request_id)
    assert job["state"] == "succeeded" and job["billed"]
    assert fal.stats()["cancel_requested"] >= 1


def test_subscribe_client_timeout_cancels_yet_a_running_job_bills(fal: FalTLS) -> None:
    c = fal.client
    fal.faults(latency_ms=2000, jitter_ms=0)  # starts at 0.6 s, within start_timeout
    before = fal.stats().get("cancel_requested", 0)
    with pytest.raises(c.FalClientTimeoutError) as err:
        c.subscribe(APP, png_input(fal, 40, 40), client_timeout=1.2, interval=0.05)
    request_id = err.value.request_id
    assert request_id in fal.jobs()
    (submitted,) = fal.requests()
    assert submitted["headers"]["x-fal-request-timeout"] == "1.2"  # start_timeout defaulted
    assert fal.stats()["cancel_requested"] == before + 1  # the client cancelled on timeout
    job = job_end(fal, request_id)
    assert job["state"] == "succeeded" and job["billed"]


def test_start_timeout_is_a_504_the_client_does_not_retry(fal: FalTLS) -> None:
    c = fal.client
    fal.faults(latency_ms=5000, jitter_ms=0)  # 1.5 s in the queue: past start_timeout
    enqueued: list[str] = []
    updates: list[Any] = []
    with pytest.raises(c.FalClientHTTPError) as err:
        c.subscribe(
            APP,
            png_input(fal, 40, 40),
            start_timeout=1.1,
            on_enqueue=enqueued.append,
            on_queue_update=updates.append,
            interval=0.05,
        )
    e = err.value
    assert e.status_code == 504 and e.error_type == "request_timeout"
    assert e.response_headers["x-fal-error-type"] == "request_timeout"
    assert e.response_headers["x-fal-request-timeout-type"] == "user"
    assert e.response_headers["x-fal-retryable"] == "true"
    done = updates[-1]
    assert isinstance(done, c.Completed) and done.error_type == "request_timeout"
    assert done.error and done.metrics == {}  # it never ran
    (submitted,) = fal.requests()
    assert submitted["headers"]["x-fal-request-timeout"] == "1.1"
    (request_id,) = enqueued
    job = job_end(fal, request_id)
    assert job["state"] == "aborted" and not job["billed"]


def test_client_errors_surface_as_fal_client_http_errors(fal: FalTLS) -> None:
    c = fal.client
    jobs_before = set(fal.jobs())
    with sync_client(fal, "wrong-key") as other, pytest.raises(c.FalClientHTTPError) as denied:
        other.submit(APP, png_input(fal, 40, 40))
    assert denied.value.status_code == 401 and "Authentication" in denied.value.message
    assert denied.value.response_headers["x-fal-retryable"] == "false"

    with pytest.raises(c.FalClientHTTPError) as no_app:
        c.submit("fal-ai/no-such-app", png_input(fal, 40, 40))
    assert no_app.value.status_code == 404
    assert no_app.value.message == "Application 'fal-ai/no-such-app' not found"

    with pytest.raises(c.FalClientHTTPError) as no_request:
        c.status(APP, "0" * 16)
    assert no_request.value.status_code == 404 and no_request.value.message == "Request not found"

    with pytest.raises(c.FalClientHTTPError) as missing:
        c.submit(APP, {"sync_mode": True})
    assert missing.value.status_code == 422 and missing.value.error_type is None
    assert missing.value.message == [
        {
            "loc": ["body", "image_url"],
            "msg": "field required",
            "type": "missing",
            "url": f"{ERRORS_DOC}missing",
        }
    ]
    assert missing.value.response_headers["x-fal-retryable"] == "false"

    with pytest.raises(c.FalClientHTTPError) as not_bool:
        c.submit(APP, {**png_input(fal, 40, 40), "sync_mode": "maybe"})
    (entry,) = not_bool.value.message
    assert entry["loc"] == ["body", "sync_mode"] and entry["type"] == "bool_parsing"
    assert entry["url"] == f"{ERRORS_DOC}bool_parsing" and entry["msg"]
    assert set(fal.jobs()) == jobs_before  # no refused submit became a job


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (500, "internal_error"),
        (502, "runner_incomplete_response"),
        (503, "runner_scheduling_failure"),
        (504, "request_timeout"),
    ],
)
def test_infrastructure_errors_name_their_type(fal: FalTLS, status: int, error_type: str) -> None:
    c = fal.client
    fal.faults(**LATENCY, error_rate=1, error_status=status)
    with pytest.raises(c.FalClientHTTPError) as err:
        c.submit(APP, png_input(fal, 40, 40))
    e = err.value
    assert e.status_code == status and e.error_type == error_type
    assert isinstance(e.message, str) and e.message
    assert e.response_headers["x-fal-error-type"] == error_type
    assert e.response_headers["x-fal-retryable"] == "true"
    assert len(fal.requests()) == 1  # fal's own 5xx is no ingress error: not retried


def test_a_rate_limited_submit_is_retried_by_the_client(fal: FalTLS) -> None:
    """fal-client retries a 429 submit on its own (DESIGN: why the gateway does not use it
    to submit): the seeded dice answer 429 to the first submit and nothing to the second."""
    c = fal.client
    fal.faults(**LATENCY, rate_limit_rate=0.5, retry_after_s=0, seed=1)
    handle = c.submit(APP, png_input(fal, 40, 40))
    assert len(fal.requests()) == 2
    assert fal.requests()[0]["auth_ok"] and handle.request_id in fal.jobs()
    assert job_end(fal, handle.request_id)["billed"]


def test_model_failures_surface_on_the_result(fal: FalTLS) -> None:
    c = fal.client
    fal.faults(latency_ms=0, jitter_ms=0, content_policy_rate=1)
    enqueued: list[str] = []
    updates: list[Any] = []
    with pytest.raises(c.FalClientHTTPError) as refused:
        c.subscribe(
            APP,
            png_input(fal, 40, 40),
            with_logs=True,
            on_enqueue=enqueued.append,
            on_queue_update=updates.append,
        )
    e = refused.value
    assert e.status_code == 422 and e.response_headers["x-fal-retryable"] == "false"
    (entry,) = e.message
    assert entry["type"] == "content_policy_violation" and entry["loc"] == ["body", "image_url"]
    assert entry["url"] == f"{ERRORS_DOC}content_policy_violation" and entry["msg"]
    done = updates[-1]
    assert isinstance(done, c.Completed) and done.error_type == "content_policy_violation"
    assert done.error and "inference_time" in done.metrics
    assert any(entry["level"] == "ERROR" for entry in check_logs(done.logs))

    fal.faults(latency_ms=0, jitter_ms=0, job_failure_rate=1)
    with pytest.raises(c.FalClientHTTPError) as crashed:
        c.subscribe(APP, png_input(fal, 40, 40), on_enqueue=enqueued.append)
    e = crashed.value
    # The model's own answer (a model error, typed in `detail`), not fal's infrastructure.
    assert e.status_code == 500 and e.error_type is None
    assert "x-fal-error-type" not in e.response_headers
    assert e.response_headers["x-fal-retryable"] == "true"
    (entry,) = e.message
    assert entry["type"] == "internal_server_error" and entry["loc"] == ["body"]
    assert entry["url"] == f"{ERRORS_DOC}internal_server_error"
    for request_id in enqueued:
        job = job_end(fal, request_id)
        assert job["state"] == "failed" and not job["billed"]  # failed jobs bill nothing
