"""Errors the gateway answers with, and their one mapping onto OpenAI's error envelope.

    GatewayError                     -> {"error": {"message", "type", "param", "code"}}
     +-- InvalidRequest        400   invalid_request_error (with param)
     |    +-- ImageRejected    400   the provider refused the image (content, invalid)
     +-- Unauthorized          401   authentication_error
     +-- NotFound              404   invalid_request_error (model_not_found, ...)
     +-- RequestTimeout        408   the request body stopped arriving, or came too slowly
     +-- ClientClosedRequest   499   the client went away mid-body (nothing hears the answer)
     +-- IdempotencyConflict   409   the Idempotency-Key was used for another request
     +-- IdempotencyInProgress 409   its request still runs, or was taken over by a retry
     +-- IdempotencyGone       409   its stored result no longer exists
     +-- RateLimited           429   requests (a key's requests a minute or in flight)
     +-- QuotaExceeded         429   insufficient_quota (a key's daily or monthly budget)
     +-- PayloadTooLarge       413   invalid_request_error
     +-- UnsupportedMediaType  415   invalid_request_error
     +-- UpstreamBadResponse   502   server_error (a provider answered nonsense)
     +-- NoProviderAvailable   503   server_error (every candidate failed or none fits)
     +-- StateUnavailable      503   server_error (a key's budget cannot be checked)
     +-- BodiesBusy            503   server_error (too many large bodies being read at once)
     +-- ResultsUnavailable    503   results_storage_unavailable (the results store is down)
     +-- DeadlineExceeded      504   server_error

Provider faults (adapters.base.ProviderError) never reach a client directly: the router
turns them into one of the above.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match

log = logging.getLogger("gateway.errors")


class GatewayError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None
    # x-should-retry for the OpenAI SDKs: None lets them apply their default (retry 5xx).
    should_retry: bool | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_value"
    should_retry = False


class ImageRejected(InvalidRequest):
    code = "invalid_image"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"
    should_retry = False


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"
    should_retry = False


class RequestTimeout(GatewayError):
    """The client stopped sending its request body."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"
    should_retry = True


class ClientClosedRequest(GatewayError):
    """The client went away mid-request (an aborted upload). Nothing hears the answer; 499
    (nginx's convention) keeps it out of the 5xx figures anyone could otherwise inflate."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"
    should_retry = True


class BodiesBusy(GatewayError):
    """Too many large bodies are being read at once: memory, not the key, is the limit."""

    status = 503
    type = "server_error"
    code = "server_busy"
    should_retry = True


class IdempotencyConflict(GatewayError):
    """The Idempotency-Key was used before for a different request."""

    status = 409
    type = "invalid_request_error"
    code = "idempotency_key_reused"
    should_retry = False


class IdempotencyInProgress(GatewayError):
    """The request holding the Idempotency-Key is still running."""

    status = 409
    type = "invalid_request_error"
    code = "idempotency_key_in_use"
    should_retry = True


class IdempotencyGone(GatewayError):
    """The request with this Idempotency-Key was served, but its result files are gone."""

    status = 409
    type = "invalid_request_error"
    code = "idempotency_result_gone"
    should_retry = False


class RateLimited(GatewayError):
    """A client key's requests a minute or requests in flight; Retry-After says when."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"
    should_retry = True


class QuotaExceeded(GatewayError):
    """A client key's budget is spent: OpenAI's insufficient_quota. A retry in seconds
    cannot help (the SDKs would retry a 429), so x-should-retry says false."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"
    should_retry = False


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"
    should_retry = False


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"
    should_retry = False


class UpstreamBadResponse(GatewayError):
    status = 502
    code = "bad_provider_response"


class NoProviderAvailable(GatewayError):
    status = 503
    code = "no_provider_available"


class ResultsUnavailable(GatewayError):
    """The results store (directory or bucket) cannot keep or serve a result now: retryable.
    A request with an Idempotency-Key that failed so is handed to its retry, which follows
    the provider job already paid for (gateway/service/edits.py)."""

    status = 503
    type = "server_error"
    code = "results_storage_unavailable"
    should_retry = True


class StateUnavailable(GatewayError):
    """The shared state a decision needs (a key's spend) cannot be read now."""

    status = 503
    code = "state_store_unavailable"
    should_retry = True


class DeadlineExceeded(GatewayError):
    status = 504
    code = "deadline_exceeded"


def envelope(message: str, type_: str, param: str | None, code: str | None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def error_response(exc: GatewayError) -> Response:
    headers = dict(exc.headers)
    if exc.should_retry is not None:
        headers["x-should-retry"] = "true" if exc.should_retry else "false"
    return Response(
        envelope(exc.message, exc.type, exc.param, exc.code),
        status_code=exc.status,
        headers=headers,
        media_type="application/json",
    )


async def handle_gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    error = GatewayError(str(exc.detail), code=_HTTP_CODES.get(status))
    error.status, error.type = status, "invalid_request_error" if status < 500 else "server_error"
    if status == 404:
        error.message = f"Unknown route: {request.method} {request.url.path}"
    error.headers = dict(exc.headers or {})  # a 405's Allow, which RFC 9110 requires
    if status == 405:
        error.headers["Allow"] = _allowed(request)
    return error_response(error)


def _allowed(request: Request) -> str:
    """Every method some route serves at this path: Starlette's Allow names the first
    route's only, and a path served by two routes (GET and POST /v1/batches) has both."""
    methods = [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL
            for route in request.app.routes
        )
    ]
    return ", ".join(methods)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _param(loc: tuple[Any, ...]) -> str:
    # ("query", "days") -> "days"; a header keeps its name as sent (Idempotency-Key).
    return ".".join(str(part) for part in loc[1:]) or str(loc[0])


async def handle_validation_error(request: Request, exc: Exception) -> Response:
    """A query, path or header parameter FastAPI checked against its declaration: the
    first problem, in OpenAI's envelope (400, as OpenAI answers; not FastAPI's 422)."""
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": ("request",), "msg": "invalid"}
    param = _param(tuple(first.get("loc", ())))
    where = first.get("loc", ("request",))[0]
    message = str(first.get("msg", "invalid"))
    return error_response(
        InvalidRequest(f"Invalid {where} parameter '{param[:60]}': {message}.", param=param[:60])
    )


def internal_error() -> GatewayError:
    return GatewayError(
        "The gateway failed unexpectedly; the error has been logged.", code="internal_error"
    )


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(internal_error())


EXCEPTION_HANDLERS = {
    GatewayError: handle_gateway_error,
    HTTPException: handle_http_exception,
    RequestValidationError: handle_validation_error,
    Exception: handle_unexpected,
}
