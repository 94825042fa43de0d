"""Replicate predictions API emulator for `recraft-ai/recraft-crisp-upscale`: model
predictions with `Prefer: wait` and `Cancel-After`, polling, cancel, the Files API, delivery
URLs (public, or needing the token), and problem+json errors.

As Replicate's API reference has it: an official model's `version` is "hidden"; `urls` holds
`get`, `cancel` and `web` (`stream` only for streaming models, and never null); `Prefer: wait`
holds the create up to 60 s (`wait=N`: N s), and a wait that runs out answers the prediction as
it is, `starting` while queued and `processing` while running; `Cancel-After` is a duration
(`30` = `30s`; units h, m, s, and ms as in Go, combining: `1h30m45s`) of at least 5 s counted
from creation, shown as `deadline`, after which a prediction still starting is `aborted` (not
billed) and a running one `canceled` (billed: see jobs.py); the documented 429 body carries
the wait in its prose and no Retry-After is promised."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import re
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters.emulators.admin import admin_routes
from adapters.emulators.config import EmulatorConfig
from adapters.emulators.imagework import InputInvalid, decode_data_uri
from adapters.emulators.jobs import EmulatorState, Job, summarize_image

MODEL = "recraft-ai/recraft-crisp-upscale"
PRICE_USD = 0.006  # per prediction (Replicate's price, and the gateway's)
VERSION = "hidden"  # official models expose no version ids
_STATUS = {"queued": "starting", "running": "processing"}
MAX_WAIT_S = 60  # a bare `Prefer: wait`, and the most `wait=N` gets
MIN_CANCEL_AFTER_S = 5
# The API reference's file example expires an hour after it was created; the same hour
# Replicate keeps API predictions' data.
FILE_TTL_S = 3600
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")  # ms before m
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z") if ts else None


def problem(status: int, title: str | None, detail: str, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"detail": detail, "status": status, **extra}
    if title:
        body["title"] = title
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


def cancel_after_s(value: str) -> float | None:
    """The seconds a Cancel-After value names, or None when it is not a duration."""
    text = value.strip()
    if _NUMBER.fullmatch(text):
        return float(text)
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    return sum(float(number) * _UNITS[unit] for number, unit in parts)


def wait_s(prefer: str) -> float | None:
    """How long a `Prefer` header asks the create to wait; None: answer at once. An
    unreadable `wait` is ignored, as RFC 7240 has servers do with preferences."""
    for preference in prefer.split(","):
        name, _, value = preference.partition("=")
        if name.strip().lower() != "wait":
            continue
        value = value.strip()
        if not value:
            return MAX_WAIT_S
        return min(MAX_WAIT_S, int(value)) if value.isdigit() else None
    return None


def create_replicate_app(config: EmulatorConfig | None = None) -> Starlette:
    state = EmulatorState(
        config or EmulatorConfig(),
        default_format="webp",
        default_price_usd=PRICE_USD,
        bill_canceled_running=True,  # Replicate bills a prediction canceled while running
    )
    uploads: dict[str, tuple[bytes, dict[str, Any]]] = {}
    client = httpx.AsyncClient(timeout=30)

    def base(request: Request) -> str:
        return state.base_url(str(request.base_url))

    def authed(request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme == "Bearer" and state.key_ok(token)

    def unauthenticated() -> JSONResponse:
        return problem(401, "Unauthenticated", "You did not pass a valid authentication token")

    def prediction(request: Request, job: Job) -> dict[str, Any]:
        url = f"{base(request)}/v1/predictions/{job.id}"
        output = None
        if job.state == "succeeded" and job.file_name:
            output = f"{base(request)}/delivery/{job.file_name}"
        created, started, done = job.created_at, job.started_at, job.completed_at
        metrics: dict[str, float] = {}
        if done is not None:
            if started is not None:
                metrics["predict_time"] = round(done - started, 6)
            metrics["total_time"] = round(done - created, 6)
        body: dict[str, Any] = {
            "id": job.id,
            "model": MODEL,
            "version": VERSION,
            "input": job.extra["input"],
            "logs": "",
            "output": output,
            "data_removed": False,
            "error": job.error,
            "status": _STATUS.get(job.state, job.state),
            "source": "api",
            "created_at": _iso(job.created_at),
            "started_at": _iso(started),
            "completed_at": _iso(done),
            # No `stream`: the model does not stream, and Replicate then leaves it out.
            "urls": {
                "get": url,
                "cancel": f"{url}/cancel",
                "web": f"https://replicate.com/p/{job.id}",
            },
            "metrics": metrics,
        }
        if job.deadline_at is not None:
            body["deadline"] = _iso(job.deadline_at)
        return body

    async def load_input(request: Request, image: str) -> bytes:
        if image.startswith("data:"):
            return decode_data_uri(image)
        parts = urlsplit(image)
        own = re.fullmatch(r"/v1/files/([0-9a-z]+)", parts.path)
        if own and image.startswith(base(request)):
            found = live_upload(own[1])
            if found is None:
                raise InputInvalid("file not found")
            return found[0]
        response = await client.get(image)
        if response.status_code != 200:
            raise InputInvalid(f"could not fetch image: HTTP {response.status_code}")
        return response.content

    async def create(request: Request) -> Response:
        model = f"{request.path_params['owner']}/{request.path_params['name']}"
        ok = authed(request)
        try:
            body = await request.json()
        except ValueError:
            body = None
        model_input = body.get("input") if isinstance(body, dict) else None
        state.requests.append(
            {
                "method": "POST",
                "path": request.url.path,
                "auth_ok": ok,
                "input": {
                    k: summarize_image(v) if k == "image" else v for k, v in model_input.items()
                }
                if isinstance(model_input, dict)
                else model_input,
                "headers": {
                    k: v for k, v in request.headers.items() if k in ("prefer", "cancel-after")
                },
            }
        )
        if not ok:
            return unauthenticated()
        if model != MODEL:
            return problem(404, None, "Not found.")
        image = model_input.get("image") if isinstance(model_input, dict) else None
        if not isinstance(image, str):
            return problem(
                422,
                "Input validation failed",
                "- input: image is required",
                invalid_fields=[
                    {"type": "required", "field": "input.image", "description": "image is required"}
                ],
            )
        cancel_after = None
        if "cancel-after" in request.headers:
            cancel_after = cancel_after_s(request.headers["cancel-after"])
            if cancel_after is None or cancel_after < MIN_CANCEL_AFTER_S:
                return problem(
                    422,
                    "Invalid Cancel-After header",
                    f"Cancel-After must be a duration of at least {MIN_CANCEL_AFTER_S}s "
                    "(e.g. 30s, 5m, 1h30m)",
                )
        limit = state.config.max_data_uri_bytes
        if limit is not None and image.startswith("data:") and len(image) * 3 // 4 > limit:
            return problem(
                413,
                "Request Entity Too Large",
                f"data URIs are limited to {limit} bytes; use the files API",
            )
        fault = state.dice.fault()
        if fault == "error":
            status = state.dice.script.error_status
            title = "Payment Required" if status == 402 else "Internal Server Error"
            detail = (
                "You have insufficient credit to run this model. Go to "
                "https://replicate.com/account/billing to purchase credit."
                if status == 402
                else "Emulated provider error"
            )
            return problem(status, title, detail)
        if fault == "rate_limit":
            wait = state.dice.script.retry_after_s
            response = problem(
                429, None, f"Request was throttled. Your rate limit resets in ~{math.ceil(wait)}s."
            )
            if state.config.replicate_retry_after_header:
                response.headers["Retry-After"] = f"{wait:g}"
            return response
        if fault == "hang" and not await state.hang(request):
            return Response(status_code=499)  # nobody is listening: no job, no bill
        job = state.new_job(fault)
        job.extra["input"] = {"image": image if not image.startswith("data:") else image[:64]}
        await state.start(job, lambda: load_input(request, image), deadline_s=cancel_after)
        hold = wait_s(request.headers.get("prefer", ""))
        if hold:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.done.wait(), hold)
        if fault == "malformed":
            return Response(
                b'{"id": "' + job.id.encode() + b'", "stat',
                status_code=201,
                media_type="application/json",
            )
        return JSONResponse(prediction(request, job), status_code=201 if job.finished else 202)

    def find(request: Request) -> Job | Response:
        if not authed(request):
            return unauthenticated()
        job = state.jobs.get(request.path_params["job_id"])
        return problem(404, None, "Not found.") if job is None else job

    async def get_prediction(request: Request) -> Response:
        job = find(request)
        if isinstance(job, Response):
            return job
        state.stats["status_polls"] += 1
        return JSONResponse(prediction(request, job))

    async def cancel(request: Request) -> Response:
        job = find(request)
        if isinstance(job, Response):
            return job
        state.cancel(job)
        return JSONResponse(prediction(request, job))

    async def delivery(request: Request) -> Response:
        if state.config.delivery_requires_token and not authed(request):
            return unauthenticated()
        response = state.file_response(request.path_params["name"])
        return response if response is not None else problem(404, None, "Not found.")

    async def upload(request: Request) -> Response:
        if not authed(request):
            return unauthenticated()
        form = await request.form(max_part_size=16 * 1024 * 1024)
        content = form.get("content")
        if not isinstance(content, UploadFile):
            return problem(400, "Bad Request", "multipart part 'content' is required")
        metadata: Any = {}
        if isinstance(raw_metadata := form.get("metadata"), str):
            try:
                metadata = json.loads(raw_metadata)
            except ValueError:
                return problem(422, "Unprocessable Entity", "metadata must be valid JSON")
        data = await content.read()
        file_id = secrets.token_hex(10)
        now = time.time()
        name = form.get("filename")
        content_type = form.get("type")
        meta = {
            "id": file_id,
            "name": name if isinstance(name, str) and name else content.filename or "file",
            "content_type": content_type
            if isinstance(content_type, str) and content_type
            else content.content_type or "application/octet-stream",
            "size": len(data),
            "etag": hashlib.md5(data).hexdigest(),
            "checksums": {
                "sha256": hashlib.sha256(data).hexdigest(),
                "md5": hashlib.md5(data).hexdigest(),
            },
            "metadata": metadata,
            "created_at": _iso(now),
            "expires_at": _iso(now + FILE_TTL_S),
            "urls": {"get": f"{base(request)}/v1/files/{file_id}"},
        }
        uploads[file_id] = (data, meta)
        while len(uploads) > state.config.max_jobs:
            uploads.pop(next(iter(uploads)))
        state.stats["files_uploaded"] += 1
        state.requests.append(
            {
                "method": "POST",
                "path": "/v1/files",
                "auth_ok": True,
                "input": {"bytes": len(data)},
                "headers": {},
            }
        )
        return JSONResponse(meta, status_code=201)

    def live_upload(file_id: str) -> tuple[bytes, dict[str, Any]] | None:
        """An uploaded file, unless it is gone: deleted, evicted, or past its expires_at."""
        found = uploads.get(file_id)
        if found is None:
            return None
        if datetime.fromisoformat(found[1]["expires_at"]).timestamp() <= time.time():
            del uploads[file_id]
            return None
        return found

    def find_upload(request: Request) -> tuple[bytes, dict[str, Any]] | Response:
        if not authed(request):
            return unauthenticated()
        found = live_upload(request.path_params["file_id"])
        return problem(404, None, "File not found") if found is None else found

    async def list_files(request: Request) -> Response:
        if not authed(request):
            return unauthenticated()
        live = [meta for file_id, (_, meta) in list(uploads.items()) if live_upload(file_id)]
        # One page holds them all (at most max_jobs): no cursors to follow.
        return JSONResponse({"results": live[::-1], "next": None, "previous": None})

    async def file_meta(request: Request) -> Response:
        found = find_upload(request)
        if isinstance(found, Response):
            return found
        if request.method == "DELETE":
            uploads.pop(request.path_params["file_id"], None)
            return Response(status_code=204)
        return JSONResponse(found[1])

    async def file_download(request: Request) -> Response:
        found = find_upload(request)
        if isinstance(found, Response):
            return found
        return Response(found[0], media_type=found[1]["content_type"])

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await state.shutdown()
        await client.aclose()

    app = Starlette(
        routes=[
            *admin_routes(state),
            Route("/v1/models/{owner}/{name}/predictions", create, methods=["POST"]),
            Route("/v1/predictions/{job_id}", get_prediction, methods=["GET"]),
            Route("/v1/predictions/{job_id}/cancel", cancel, methods=["POST"]),
            Route("/v1/files", upload, methods=["POST"]),
            Route("/v1/files", list_files, methods=["GET"]),
            Route("/v1/files/{file_id}", file_meta, methods=["GET", "DELETE"]),
            Route("/v1/files/{file_id}/download", file_download, methods=["GET"]),
            Route("/delivery/{name}", delivery, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.emulator = state
    return app
