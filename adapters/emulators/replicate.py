"""Replicate predictions API emulator for `recraft-ai/recraft-crisp-upscale`: model
predictions with `Prefer: wait` and `Cancel-After`, polling, cancel, the Files API, public
delivery URLs, and problem+json errors."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import secrets
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
VERSION = "0d" * 32
_STATUS = {"queued": "starting", "running": "processing"}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z") if ts else None


def problem(status: int, title: str | None, detail: str, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"detail": detail, "status": status, **extra}
    if title:
        body["title"] = title
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


def _duration(value: str) -> float | None:
    match = _DURATION.match(value)
    return float(match[1]) * _UNITS[match[2]] if match else None


def create_replicate_app(config: EmulatorConfig | None = None) -> Starlette:
    state = EmulatorState(
        config or EmulatorConfig(), default_format="webp", default_price_usd=PRICE_USD
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
        started, done = job.started_at, job.completed_at
        return {
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
            "urls": {
                "get": url,
                "cancel": f"{url}/cancel",
                "stream": None,
                "web": f"https://replicate.com/p/{job.id}",
            },
            "metrics": {"predict_time": round(done - started, 3)} if started and done else {},
        }

    async def load_input(request: Request, image: str) -> bytes:
        if image.startswith("data:"):
            return decode_data_uri(image)
        parts = urlsplit(image)
        own = re.fullmatch(r"/v1/files/([0-9a-z]+)", parts.path)
        if own and image.startswith(base(request)):
            if own[1] not in uploads:
                raise InputInvalid("file not found")
            return uploads[own[1]][0]
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
                429,
                "Request was throttled.",
                f"Request was throttled. Expected available in {wait:g} second.",
            )
            response.headers["Retry-After"] = f"{wait:g}"
            return response
        if fault == "hang" and not await state.hang(request):
            return Response(status_code=499)  # nobody is listening: no job, no bill
        job = state.new_job(fault)
        job.extra["input"] = {"image": image if not image.startswith("data:") else image[:64]}
        cancel_after = _duration(request.headers.get("cancel-after", ""))
        await state.start(job, lambda: load_input(request, image), cancel_after)
        wait = re.search(r"wait=(\d+)", request.headers.get("prefer", ""))
        if wait:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.done.wait(), min(60, int(wait[1])))
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
        return job if isinstance(job, Response) else JSONResponse(prediction(request, job))

    async def cancel(request: Request) -> Response:
        job = find(request)
        if isinstance(job, Response):
            return job
        state.cancel(job)
        return JSONResponse(prediction(request, job))

    async def delivery(request: Request) -> Response:
        response = state.file_response(request.path_params["name"])
        return response if response is not None else problem(404, None, "Not found.")

    async def upload(request: Request) -> Response:
        if not authed(request):
            return unauthenticated()
        form = await request.form(max_part_size=16 * 1024 * 1024)
        content = form.get("content")
        if not isinstance(content, UploadFile):
            return problem(400, "Bad Request", "multipart part 'content' is required")
        data = await content.read()
        file_id = secrets.token_hex(10)
        now = datetime.now(UTC)
        meta = {
            "id": file_id,
            "name": content.filename or "file",
            "content_type": form.get("type") or content.content_type or "application/octet-stream",
            "size": len(data),
            "etag": hashlib.md5(data).hexdigest(),
            "checksums": {
                "sha256": hashlib.sha256(data).hexdigest(),
                "md5": hashlib.md5(data).hexdigest(),
            },
            "metadata": {},
            "created_at": now.isoformat().replace("+00:00", "Z"),
            "expires_at": None,
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

    def find_upload(request: Request) -> tuple[bytes, dict[str, Any]] | Response:
        if not authed(request):
            return unauthenticated()
        found = uploads.get(request.path_params["file_id"])
        return problem(404, None, "Not found.") if found is None else found

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
            Route("/v1/files/{file_id}", file_meta, methods=["GET", "DELETE"]),
            Route("/v1/files/{file_id}/download", file_download, methods=["GET"]),
            Route("/delivery/{name}", delivery, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.emulator = state
    return app
