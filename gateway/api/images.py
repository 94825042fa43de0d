"""POST /v1/images/edits: the upscale endpoint, shaped like OpenAI's image edits."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.body import EditBody, read_edit_body
from gateway.api.context import Services, request_id, services
from gateway.errors import NotFound
from gateway.idempotency import HEADER, fingerprint
from gateway.imaging import FinishedImage
from gateway.params import UpscaleParams, parse_params
from gateway.routing.preferences import Preferences, parse_preferences
from gateway.routing.router import RoutingFailed


async def create_edit(request: Request) -> Response:
    svc = services(request)
    config = svc.config
    body = await read_edit_body(request, config.limits.max_image_bytes)
    params = parse_params(body.fields, config)
    prefs = parse_preferences(body.fields.get("provider"), svc.router.names)
    if params.model not in svc.model_ids:
        raise NotFound(
            f"The model '{params.model[:100]}' does not exist; this gateway serves "
            f"'{config.model.id}'.",
            param="model",
            code="model_not_found",
        )
    header = request.headers.get(HEADER)
    if header is None:
        return await _upscale(request, svc, body, params, prefs)
    return await _idempotent(request, svc, header, body, params, prefs)


async def _idempotent(
    request: Request,
    svc: Services,
    header: str,
    body: EditBody,
    params: UpscaleParams,
    prefs: Preferences,
) -> Response:
    key = svc.idempotency.scoped(header, request.scope["state"].get("key_id") or "open")
    print_ = fingerprint(
        body.image if body.image is not None else body.image_ref or "", body.fields
    )
    urls = params.response_format == "url"
    stored = await svc.idempotency.claim(key, print_)
    if stored is not None:
        # Already served (and billed) once: the same images, costing nothing more.
        headers = {
            **stored.headers,
            "x-upscale-cost-usd": f"{0:.6f}",
            "idempotent-replayed": "true",
        }
        content = stored.body
        if urls:  # signed afresh: the first URLs may have expired
            payload = orjson.loads(content)
            for item in payload["data"]:
                item["url"] = svc.signed_url(request, _file_id(item["url"]))
            content = orjson.dumps(payload)
        return Response(content, media_type="application/json", headers=headers)
    try:
        response = await _upscale(request, svc, body, params, prefs)
    except BaseException:
        # Failed: nothing to replay, so the client's retry may run.
        await asyncio.shield(svc.idempotency.release(key, print_))
        raise
    if urls:  # a replay may come after the results' own lifetime
        for item in orjson.loads(response.body)["data"]:
            await svc.results.keep(_file_id(item["url"]), svc.config.idempotency.ttl_s)
    kept = {k: v for k, v in response.headers.items() if k.startswith("x-upscale-")}
    await svc.idempotency.finish(key, print_, bytes(response.body), kept.items())
    return response


def _file_id(url: str) -> str:
    return url.split("/v1/files/", 1)[1].split("/", 1)[0]


async def _upscale(
    request: Request, svc: Services, body: EditBody, params: UpscaleParams, prefs: Preferences
) -> Response:
    data = body.image if body.image is not None else await svc.fetcher.load(body.image_ref or "")
    source = await svc.upscaler.prepare(data)
    rid = request_id(request)
    try:
        result = await svc.upscaler.run(source, params, prefs, rid)
    except RoutingFailed as failed:
        failed.error.headers["x-upscale-attempts"] = ",".join(a.header() for a in failed.attempts)
        raise failed.error from None
    first = result.images[0]
    payload = {
        "created": int(time.time()),
        "data": [],
        "output_format": params.output_format,
        "size": f"{first.width}x{first.height}",
    }
    if params.response_format == "b64_json":
        # Megabytes of base64 and JSON: a worker thread's job, not the event loop's.
        content = await asyncio.to_thread(_b64_body, payload, result.images)
    else:
        for image in result.images:
            file_id = await svc.results.put(image.data, image.output_format)
            payload["data"].append({"url": svc.signed_url(request, file_id)})
        content = orjson.dumps(payload)
    return Response(
        content,
        media_type="application/json",
        headers={
            "x-upscale-provider": ",".join(dict.fromkeys(result.providers)),
            "x-upscale-cost-usd": f"{result.cost_usd:.6f}",
            "x-upscale-attempts": ",".join(a.header() for a in result.attempts),
        },
    )


def _b64_body(payload: dict[str, Any], images: list[FinishedImage]) -> bytes:
    payload["data"] = [{"b64_json": base64.b64encode(i.data).decode("ascii")} for i in images]
    return orjson.dumps(payload)


routes = [Route("/v1/images/edits", create_edit, methods=["POST"])]
