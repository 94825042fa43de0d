"""fal.ai queue API emulator for `fal-ai/recraft/upscale/crisp` (see DESIGN.md: the queue
protocol, status codes, error bodies and the URL shapes real clients must follow), checked
against the official fal-client in tests/conformance/test_fal_client.py.

Error answers come in fal's two documented shapes: a model error is `{"detail": [{loc, msg,
type, url}]}` (the model's own answer, validation included); an infrastructure error is flat,
`{"detail": "...", "error_type": ...}` with the same type in `X-Fal-Error-Type`, which is how
a client tells fal's trouble from the job's. Every error says in `X-Fal-Retryable` whether
sending the same request again may help.

Cancelling a queued request removes it (it never runs, nothing is billed); cancelling one in
progress only signals its runner: it runs on to its end and, if it succeeds, is billed."""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters.emulators.admin import admin_routes
from adapters.emulators.config import EmulatorConfig
from adapters.emulators.imagework import decode_data_uri
from adapters.emulators.jobs import EmulatorState, Job, summarize_image

APP_ID = "fal-ai/recraft/upscale/crisp"
PRICE_USD = 0.004  # per image (fal's price for the app, and the gateway's)
QUEUE_PREFIX = "fal-ai/recraft"  # result URLs carry only owner and the app's first segment
# fal's request error types for the statuses the error fault answers (docs: Request Errors).
_INFRA = {
    500: "internal_error",
    502: "runner_incomplete_response",
    503: "runner_scheduling_failure",
    504: "request_timeout",
}
_BOOL_FIELDS = ("sync_mode", "enable_safety_checker")
ERRORS_DOC = "https://docs.fal.ai/errors#"  # each model error links its type's entry
# The REST docs say ?logs=1; fal_client passes logs=<bool>, which httpx writes as "true".
_LOGS_ON = frozenset({"1", "true"})


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _detail(
    status: int, message: str, error_type: str | None = None, *, retryable: bool = False
) -> JSONResponse:
    """A flat error answer; with `error_type`, one of fal's infrastructure errors."""
    body: dict[str, Any] = {"detail": message}
    headers = {"X-Fal-Retryable": _flag(retryable)}
    if error_type:
        body["error_type"] = error_type
        headers["X-Fal-Error-Type"] = error_type
    return JSONResponse(body, status_code=status, headers=headers)


def _model_error(
    status: int, loc: list[str], msg: str, kind: str, *, retryable: bool = False
) -> JSONResponse:
    entry = {"loc": loc, "msg": msg, "type": kind, "url": f"{ERRORS_DOC}{kind}"}
    return JSONResponse(
        {"detail": [entry]}, status_code=status, headers={"X-Fal-Retryable": _flag(retryable)}
    )


def _validation(field: str | None, msg: str, kind: str) -> JSONResponse:
    return _model_error(422, ["body", field] if field else ["body"], msg, kind)


def _log(at: float, level: str, message: str) -> dict[str, str]:
    stamp = datetime.fromtimestamp(at, UTC).isoformat()
    return {"message": message, "level": level, "source": "user", "timestamp": stamp}


def _logs(job: Job) -> list[dict[str, str]]:
    """What the runner logged so far, in order: fal's status answers carry these when
    asked (`logs=1`), else `logs: null`."""
    entries = []
    if job.started_at is not None:
        entries.append(_log(job.started_at, "INFO", "Upscaling started"))
    if (asked := job.extra.get("cancel_requested_at")) is not None:
        entries.append(_log(asked, "WARNING", "Cancellation requested; the request runs on"))
    if job.completed_at is not None:
        if job.error:
            entries.append(_log(job.completed_at, "ERROR", job.error))
        elif job.state == "canceled":
            entries.append(_log(job.completed_at, "INFO", "Request cancelled"))
        elif job.output is not None:
            size = f"{job.output.width}x{job.output.height}"
            entries.append(_log(job.completed_at, "INFO", f"Upscaled to {size}"))
    return entries


def _metrics(job: Job) -> dict[str, float]:
    """fal's metrics of a completed request: the seconds it spent running (none if it
    never ran: cancelled in the queue, or past its start timeout)."""
    if job.started_at is None or job.completed_at is None:
        return {}
    return {"inference_time": round(job.completed_at - job.started_at, 6)}


def create_fal_app(config: EmulatorConfig | None = None) -> Starlette:
    state = EmulatorState(
        config or EmulatorConfig(), default_format="png", default_price_usd=PRICE_USD
    )
    client = httpx.AsyncClient(timeout=30)

    def urls(request: Request, job_id: str) -> dict[str, str]:
        base = f"{state.base_url(str(request.base_url))}/{QUEUE_PREFIX}/requests/{job_id}"
        return {
            "response_url": base,
            "status_url": f"{base}/status",
            "cancel_url": f"{base}/cancel",
        }

    def authed(request: Request) -> bool:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        return scheme == "Key" and state.key_ok(key)

    async def submit(request: Request) -> Response:
        if request.path_params["app"] != APP_ID:
            return _detail(404, f"Application '{request.path_params['app']}' not found")
        ok = authed(request)
        try:
            body = await request.json()
        except ValueError:
            body = None
        state.requests.append(
            {
                "method": "POST",
                "path": request.url.path,
                "auth_ok": ok,
                "input": {k: summarize_image(v) if k == "image_url" else v for k, v in body.items()}
                if isinstance(body, dict)
                else body,
                "headers": {k: v for k, v in request.headers.items() if k.startswith("x-fal-")},
            }
        )
        if not ok:
            return _detail(401, "Authentication is required to access this application.")
        if not isinstance(body, dict):
            return _validation(None, "body must be a JSON object", "dict_type")
        if not isinstance(body.get("image_url"), str):
            return _validation("image_url", "field required", "missing")
        for name in _BOOL_FIELDS:
            if name in body and not isinstance(body[name], bool):
                return _validation(name, "value could not be parsed to a boolean", "bool_parsing")
        max_queue = request.query_params.get("fal_max_queue_length")
        queued = sum(1 for j in state.jobs.values() if j.state == "queued")
        if max_queue and max_queue.isdigit() and queued >= int(max_queue):
            return _detail(429, "Queue is full", "queue_full", retryable=True)
        fault = state.dice.fault()
        if fault == "error":
            status = state.dice.script.error_status
            error_type = _INFRA.get(status, "internal_error")
            return _detail(status, "Emulated provider error", error_type, retryable=True)
        if fault == "rate_limit":
            response = _detail(429, "Rate limit exceeded", "rate_limited", retryable=True)
            response.headers["Retry-After"] = f"{state.dice.script.retry_after_s:g}"
            return response
        if fault == "hang" and not await state.hang(request):
            return Response(status_code=499)  # nobody is listening: no job, no bill
        job = state.new_job(fault)
        job.extra["sync_mode"] = body.get("sync_mode") is True
        # fal runs low-priority work after normal work; the emulator keeps what it was asked.
        job.extra["priority"] = request.headers.get("x-fal-queue-priority", "normal")
        timeout = request.headers.get("x-fal-request-timeout", "")
        image_url = body["image_url"]

        async def load() -> bytes:
            if image_url.startswith("data:"):
                return decode_data_uri(image_url)
            response = await client.get(image_url)
            response.raise_for_status()
            return response.content

        await state.start(
            job, load, float(timeout) if timeout.replace(".", "", 1).isdigit() else None
        )
        if fault == "malformed":
            return Response(
                b'{"request_id": "' + job.id.encode() + b'", "status_',
                status_code=200,
                media_type="application/json",
            )
        return JSONResponse({"request_id": job.id, **urls(request, job.id), "queue_position": 0})

    def find(request: Request) -> Job | Response:
        """The job a queue URL names, or the error answer for it."""
        if not authed(request):
            return _detail(401, "Authentication is required.")
        job = state.jobs.get(request.path_params["job_id"])
        return _detail(404, "Request not found") if job is None else job

    async def status(request: Request) -> Response:
        job = find(request)
        if isinstance(job, Response):
            return job
        state.stats["status_polls"] += 1
        asked = request.query_params.get("logs", "").lower() in _LOGS_ON
        body: dict[str, Any] = {
            "response_url": urls(request, job.id)["response_url"],
            "logs": _logs(job) if asked else None,
        }
        if job.state == "queued":
            queue = [j for j in state.jobs.values() if j.state == "queued"]
            return JSONResponse(
                {**body, "status": "IN_QUEUE", "queue_position": queue.index(job)}, status_code=202
            )
        if job.state == "running":
            return JSONResponse(
                {**body, "status": "IN_PROGRESS", "queue_position": None}, status_code=202
            )
        body.update(status="COMPLETED", queue_position=None, metrics=_metrics(job))
        if job.error:
            body.update(error=job.error, error_type=_ERROR_TYPES.get(job.error_kind or ""))
        return JSONResponse(body)

    async def result(request: Request) -> Response:
        job = find(request)
        if isinstance(job, Response):
            return job
        if not job.finished:
            return _detail(400, "Request is still in progress", retryable=True)
        if job.state in ("canceled", "aborted"):
            if job.error_kind == "timeout":
                # The start timeout the caller set (X-Fal-Request-Timeout) passed: fal says
                # it was the user's, and fal_client does not retry such a 504.
                response = _detail(
                    504,
                    "Request timed out before processing started",
                    "request_timeout",
                    retryable=True,
                )
                response.headers["X-Fal-Request-Timeout-Type"] = "user"
                return response
            return _detail(400, "Request was cancelled")
        if job.error_kind in ("invalid", "policy"):
            kind = "content_policy_violation" if job.error_kind == "policy" else "image_load_error"
            return _validation("image_url", job.error or "", kind)
        if job.error_kind == "model":
            # The model's own failure, not fal's infrastructure: a typed model error and no
            # X-Fal-Error-Type, so clients know the job ended (failed, unbilled).
            return _model_error(
                500, ["body"], job.error or "model error", "internal_server_error", retryable=True
            )
        if job.output is None:
            return JSONResponse({"image": None})
        out = job.output
        if job.extra.get("sync_mode"):
            url = f"data:{out.content_type};base64,{base64.b64encode(out.data).decode()}"
            if job.fault == "truncated":
                url = url[: len(url) // 2]
        else:
            url = f"{state.base_url(str(request.base_url))}/files/{job.file_name}"
        return JSONResponse(
            {
                "image": {
                    "url": url,
                    "content_type": out.content_type,
                    "file_name": job.file_name,
                    "file_size": len(out.data),
                    "width": out.width,
                    "height": out.height,
                }
            }
        )

    async def cancel(request: Request) -> Response:
        job = find(request)
        if isinstance(job, Response):
            return job
        if job.state == "running":
            # fal only signals a running request's runner: it runs on to its end, and a
            # success is billed. The cancel is recorded (stats, and the job's logs).
            job.extra.setdefault("cancel_requested_at", time.time())
            state.stats["cancel_requested"] += 1
            return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)
        if state.cancel(job):  # still queued: it leaves the queue and never runs
            return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)
        return JSONResponse(
            {"status": "ALREADY_COMPLETED"},
            status_code=400,
            headers={"X-Fal-Retryable": "false"},
        )

    async def files(request: Request) -> Response:
        response = state.file_response(request.path_params["name"])
        return response if response is not None else _detail(404, "File not found")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await state.shutdown()
        await client.aclose()

    requests_path = f"/{QUEUE_PREFIX}/requests/{{job_id}}"
    app = Starlette(
        routes=[
            *admin_routes(state),
            Route("/files/{name}", files, methods=["GET"]),
            Route(f"{requests_path}/status", status, methods=["GET"]),
            Route(f"{requests_path}/cancel", cancel, methods=["PUT"]),
            Route(requests_path, result, methods=["GET"]),
            Route("/{app:path}", submit, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.emulator = state
    return app


_ERROR_TYPES = {
    "invalid": "image_load_error",
    "policy": "content_policy_violation",
    "model": "internal_server_error",
    "timeout": "request_timeout",
}
