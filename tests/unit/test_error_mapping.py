"""How each adapter classifies its provider's documented error answers: only a refusal of the
caller's image (a validation error located at the image input, a content-policy refusal
named by its type) is the caller's; a refusal of what the gateway itself sent (a header, a
parameter, a job state) is retryable elsewhere and logged. Scripted with httpx.MockTransport
speaking fal's and Replicate's documented bodies and headers."""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
import pytest

from adapters.base import (
    ProviderBadResponse,
    ProviderError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderUnavailable,
    UpscaleJob,
)
from adapters.fal import FalAdapter
from adapters.replicate import ReplicateAdapter
from adapters.wire import MAX_RETRY_AFTER_S
from tests.unit.test_adapter_billing import FAL, PRED, REP, REQ, settings, submitted

pytestmark = pytest.mark.anyio


def job() -> UpscaleJob:
    return UpscaleJob(b"\x89PNG", 32, 32, time.monotonic() + 5.0, "req")


def fal_validation(status: int, *entries: dict[str, Any], **headers: str) -> httpx.Response:
    """fal's model-error shape: `{"detail": [{loc, msg, type, url}]}`."""
    detail = [{"url": f"https://docs.fal.ai/errors#{e['type']}", **e} for e in entries]
    return httpx.Response(status, json={"detail": detail}, headers=headers)


def fal_request_error(status: int, detail: str, error_type: str) -> httpx.Response:
    """fal's request-error shape: a flat `detail` plus `error_type` and its header."""
    return httpx.Response(
        status,
        json={"detail": detail, "error_type": error_type},
        headers={"X-Fal-Error-Type": error_type},
    )


async def fal_outcome(
    submit: httpx.Response | None = None, result: httpx.Response | None = None
) -> tuple[ProviderError, list[httpx.Request]]:
    """Run one fal job whose submit (or, once COMPLETED, whose result URL) answers as given."""
    seen: list[httpx.Request] = []

    def queue(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        url = str(request.url)
        if request.method == "POST":
            return submit or submitted()
        if url == f"{REQ}/status":
            return httpx.Response(200, json={"status": "COMPLETED"})
        if url == REQ and result is not None:
            return result
        if request.method == "PUT":
            return httpx.Response(400, json={"status": "ALREADY_COMPLETED"})
        return httpx.Response(404, json={"detail": "not found"})

    adapter = FalAdapter(
        settings("fal", FAL), httpx.AsyncClient(transport=httpx.MockTransport(queue))
    )
    with pytest.raises(ProviderError) as raised:
        await adapter.upscale(job())
    await adapter.aclose()
    return raised.value, seen


def problem(status: int, title: str, detail: str, **extra: Any) -> httpx.Response:
    """Replicate's problem+json shape."""
    return httpx.Response(
        status,
        json={"title": title, "detail": detail, "status": status, **extra},
        headers={"content-type": "application/problem+json"},
    )


async def replicate_outcome(
    create: httpx.Response | None = None, failure: str | None = None
) -> ProviderError:
    """Run one prediction whose create answers as given (or which fails with `failure`)."""

    def api(request: httpx.Request) -> httpx.Response:
        if create is not None:
            return create
        return httpx.Response(
            201,
            json={
                "id": "p1",
                "status": "failed",
                "error": failure,
                "started_at": "2025-01-01T00:00:00Z",
                "urls": {"get": PRED, "cancel": f"{PRED}/cancel"},
            },
        )

    client = httpx.AsyncClient(transport=httpx.MockTransport(api))
    adapter = ReplicateAdapter(settings("replicate", REP), client)
    with pytest.raises(ProviderError) as raised:
        await adapter.upscale(job())
    await adapter.aclose()
    return raised.value


def assert_gateways_own(error: ProviderError, status: int) -> None:
    assert isinstance(error, ProviderUnavailable), error
    assert error.retryable and error.upstream_status == status


# fal: a refusal of something the gateway sent (a parameter, a header, a query field).
FAL_GATEWAYS_OWN = [
    fal_validation(
        422,
        {
            "loc": ["body", "sync_mode"],
            "msg": "Input should be a valid boolean",
            "type": "bool_parsing",
        },
    ),
    fal_validation(
        422,
        {
            "loc": ["body", "enable_safety_checker"],
            "msg": "value could not be parsed to a boolean",
            "type": "type_error.bool",
        },
    ),
    fal_validation(
        422,
        {
            "loc": ["header", "x-fal-request-timeout"],
            "msg": "not an integer",
            "type": "int_parsing",
        },
    ),
    fal_validation(
        422, {"loc": ["query", "fal_webhook"], "msg": "invalid url", "type": "url_parsing"}
    ),
    fal_request_error(400, "Invalid X-Fal-Request-Timeout header value", "bad_request"),
]


@pytest.mark.parametrize("answer", FAL_GATEWAYS_OWN)
async def test_fal_refusing_the_gateways_own_request_is_retryable_and_logged(
    answer: httpx.Response, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        error, _ = await fal_outcome(submit=answer)
    assert_gateways_own(error, answer.status_code)
    assert not isinstance(error, ProviderRejected)
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert logged and "gateway" in logged[0].getMessage()
    assert "fal" in logged[0].getMessage()


async def test_fal_a_safety_checker_field_is_not_a_content_policy_refusal() -> None:
    # The policy words used to match the field's name inside a validation message.
    error, _ = await fal_outcome(submit=FAL_GATEWAYS_OWN[1])
    assert getattr(error, "code", None) != "content_policy_violation" and error.retryable


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (
            fal_validation(
                422,
                {
                    "loc": ["body", "image_url"],
                    "msg": "Failed to load the image",
                    "type": "image_load_error",
                },
            ),
            "invalid_image",
        ),
        (
            fal_validation(
                422,
                {
                    "loc": ["body", "image_url"],
                    "msg": "Image dimensions are too large",
                    "type": "image_too_large",
                    "ctx": {"max_height": 4096, "max_width": 4096},
                },
                **{"X-Fal-Retryable": "false"},
            ),
            "invalid_image",
        ),
        (
            fal_validation(
                422,
                {
                    "loc": ["body", "image_url"],
                    "msg": "The content was flagged by a content checker.",
                    "type": "content_policy_violation",
                },
            ),
            "content_policy_violation",
        ),
    ],
)
async def test_fal_a_refusal_of_the_image_is_the_callers(answer: httpx.Response, code: str) -> None:
    for where in ("submit", "result"):
        error, _ = await fal_outcome(**{where: answer})
        assert isinstance(error, ProviderRejected), (where, error)
        assert error.code == code and not error.retryable and error.upstream_status == 422


async def test_fal_retryable_header_overrides_a_refusal_of_the_image() -> None:
    answer = fal_validation(
        422,
        {
            "loc": ["body", "image_url"],
            "msg": "Failed to load the image",
            "type": "image_load_error",
        },
        **{"X-Fal-Retryable": "true"},  # fal: the same request may succeed: not the input's fault
    )
    error, _ = await fal_outcome(submit=answer)
    assert isinstance(error, ProviderUnavailable) and error.retryable


async def test_fal_a_mixed_refusal_is_not_blamed_on_the_caller() -> None:
    answer = fal_validation(
        422,
        {
            "loc": ["body", "image_url"],
            "msg": "Failed to load the image",
            "type": "image_load_error",
        },
        {
            "loc": ["body", "sync_mode"],
            "msg": "Input should be a valid boolean",
            "type": "bool_parsing",
        },
    )
    error, _ = await fal_outcome(submit=answer)
    assert_gateways_own(error, 422)


async def test_fal_a_cancelled_jobs_result_is_retryable_and_not_the_callers() -> None:
    error, seen = await fal_outcome(
        result=httpx.Response(400, json={"detail": "Request was cancelled"})
    )
    assert (
        isinstance(error, ProviderUnavailable) and error.retryable and error.upstream_status == 400
    )
    assert "cancel" in error.message
    assert not any(r.method == "PUT" for r in seen)  # it has ended: nothing to cancel


async def test_fal_not_retryable_upstream_still_fails_over() -> None:
    answer = httpx.Response(500, json={"detail": "boom"}, headers={"X-Fal-Retryable": "false"})
    error, _ = await fal_outcome(submit=answer)
    assert isinstance(error, ProviderUnavailable) and error.retryable  # another provider may


# Replicate: problem+json, and a prediction's own `error`.
@pytest.mark.parametrize(
    "answer",
    [
        problem(
            422,
            "Input validation failed",
            "- input: Additional property scale is not allowed\n",
            invalid_fields=[
                {
                    "type": "additional_property_not_allowed",
                    "field": "input",
                    "description": "Additional property scale is not allowed",
                }
            ],
        ),
        problem(
            422,
            "Input validation failed",
            "- input: image is required",
            invalid_fields=[
                {"type": "required", "field": "input.image", "description": "image is required"}
            ],
        ),
        problem(422, "Unprocessable Entity", "Invalid Cancel-After header"),
        problem(400, "Bad Request", "multipart part 'content' is required"),
    ],
)
async def test_replicate_refusing_the_gateways_own_request_is_retryable(
    answer: httpx.Response, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        error = await replicate_outcome(create=answer)
    assert_gateways_own(error, answer.status_code)
    assert any("gateway" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


async def test_replicate_an_invalid_image_field_is_the_callers() -> None:
    answer = problem(
        422,
        "Input validation failed",
        "- input.image: Does not match format 'uri'\n",
        invalid_fields=[
            {"type": "format", "field": "input.image", "description": "Does not match format 'uri'"}
        ],
    )
    error = await replicate_outcome(create=answer)
    assert isinstance(error, ProviderRejected) and error.code == "invalid_image"
    assert not error.retryable and "format" in error.message


@pytest.mark.parametrize(
    ("failure", "outcome"),
    [
        ("cannot identify image file <_io.BytesIO object at 0x7f>", "invalid_image"),
        ("image is too large: 5000x5000 exceeds 4096x4096", "invalid_image"),
        (
            "NSFW content detected. Try running it again, or try a different prompt.",
            "content_policy_violation",
        ),
        (
            "The input or output was flagged as sensitive. Please try again with different "
            "inputs. (E005)",
            "content_policy_violation",
        ),
        # A model's own trouble that merely names its safety checker is no policy refusal.
        ("safety checker model failed to load: CUDA error", ProviderBadResponse),
        ("CUDA out of memory", ProviderBadResponse),
    ],
)
async def test_replicate_failed_predictions(failure: str, outcome: str | type) -> None:
    error = await replicate_outcome(failure=failure)
    if isinstance(outcome, str):
        assert isinstance(error, ProviderRejected) and error.code == outcome
    else:
        assert isinstance(error, outcome) and error.retryable


@pytest.mark.parametrize(
    ("detail", "headers", "wait"),
    [
        ("Request was throttled. Your rate limit resets in ~30s.", {}, 30.0),
        ("Request was throttled. Expected available in 5 second.", {}, 5.0),
        ("Request was throttled. Expected available in 2 seconds.", {}, 2.0),
        ("Request was throttled. Your rate limit resets in 1m.", {}, 60.0),
        ("Request was throttled. Your rate limit resets in ~1m30s.", {}, 90.0),
        ("Request was throttled. Your rate limit resets in ~30s.", {"retry-after": "2"}, 2.0),
        ("Request was throttled. Your rate limit resets in ~30s.", {"retry-after-ms": "1500"}, 1.5),
        ("Request was throttled. Your rate limit resets in ~99999s.", {}, MAX_RETRY_AFTER_S),
        ("Request was throttled.", {"retry-after": "86400"}, MAX_RETRY_AFTER_S),
        ("Request was throttled.", {}, None),
    ],
)
async def test_replicate_429_reads_its_wait_from_the_prose(
    detail: str, headers: dict[str, str], wait: float | None
) -> None:
    answer = httpx.Response(429, json={"detail": detail, "status": 429}, headers=headers)
    error = await replicate_outcome(create=answer)
    assert isinstance(error, ProviderRateLimited)
    assert error.retry_after == (pytest.approx(wait) if wait is not None else None)


async def test_fal_a_policy_refusal_stays_the_callers_even_if_fal_calls_it_retryable() -> None:
    refused = fal_validation(
        422,
        {"loc": ["body", "image_url"], "msg": "flagged", "type": "content_policy_violation"},
        **{"X-Fal-Retryable": "true"},
    )
    error, _ = await fal_outcome(result=refused)
    assert isinstance(error, ProviderRejected) and error.code == "content_policy_violation"
