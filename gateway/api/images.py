"""POST /v1/images/edits: the upscale endpoint, shaped like OpenAI's image edits."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.accounts import OPEN_ACCOUNT, Bill
from gateway.api.body import EditBody, read_edit_body
from gateway.api.context import Services, request_id, services
from gateway.cache import CachedResult, cache_key
from gateway.errors import NotFound
from gateway.idempotency import HEADER, Journal, fingerprint
from gateway.imaging import FinishedImage
from gateway.params import UpscaleParams, parse_params
from gateway.routing.preferences import Preferences, parse_preferences
from gateway.routing.router import RoutingFailed
from gateway.upscale import Upscaled


async def create_edit(request: Request) -> Response:
    svc = services(request)
    config = svc.config
    body = await read_edit_body(
        request, config.limits.max_image_bytes, config.limits.body_idle_timeout_s
    )
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
        return await _serve(request, svc, body, params, prefs)
    return await _idempotent(request, svc, header, body, params, prefs)


async def _idempotent(
    request: Request,
    svc: Services,
    header: str,
    body: EditBody,
    params: UpscaleParams,
    prefs: Preferences,
) -> Response:
    key = svc.idempotency.scoped(header, _account(request))
    print_ = fingerprint(
        body.image if body.image is not None else body.image_ref or "", body.fields
    )
    urls = params.response_format == "url"
    claimed = await svc.idempotency.claim(key, print_)
    stored = claimed.stored
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
        async with svc.idempotency.held(key, print_):
            response = await _serve(request, svc, body, params, prefs, claimed.journal)
    except BaseException:
        # Failed: nothing to replay, so the client's retry may run.
        await asyncio.shield(svc.idempotency.release(key, print_))
        raise
    if urls:  # a replay may come after the results' own lifetime
        for item in orjson.loads(response.body)["data"]:
            file_id = _file_id(item["url"])
            await svc.results.keep(file_id, svc.config.idempotency.ttl_s)
            await svc.cache.files.keep(file_id, svc.config.idempotency.ttl_s)
    kept = {k: v for k, v in response.headers.items() if k.startswith("x-upscale-")}
    await svc.idempotency.finish(key, print_, bytes(response.body), kept.items())
    return response


def _file_id(url: str) -> str:
    return url.split("/v1/files/", 1)[1].split("/", 1)[0]


def _account(request: Request) -> str:
    return request.scope["state"].get("key_id") or OPEN_ACCOUNT


async def _serve(
    request: Request,
    svc: Services,
    body: EditBody,
    params: UpscaleParams,
    prefs: Preferences,
    journal: Journal | None = None,
) -> Response:
    """Admit the request against its key's limits, then answer it from the cache or run it."""
    worst, cheapest = await svc.router.prices(prefs)
    n = params.n
    async with svc.accounts.admitted(_account(request), worst * n, cheapest * n) as bill:
        if bill.cheapest_only:  # near the budget: only what the lease holds may be spent
            prefs = replace(prefs, max_price=cheapest, hedge=False)
        data = (
            body.image if body.image is not None else await svc.fetcher.load(body.image_ref or "")
        )
        if not (svc.config.cache.enabled and params.cache is not False):
            result = await _upscale(request, svc, data, params, prefs, bill, journal)
            files = (  # a file only where a URL will name it
                [await svc.results.put(i.data, i.output_format) for i in result.images]
                if params.response_format == "url"
                else []
            )
            stored = CachedResult.of(files, result.images, result.providers)
            return await _respond(
                request, svc, params, stored, result.images, _headers(result, "bypass")
            )
        key = cache_key(data, params, svc.config.output)
        async with svc.cache.slot(key) as slot:
            if slot.entry is not None:
                bill.counts["cache_hits"] += 1
                headers = _headers(None, slot.kind, slot.entry.providers)
                return await _respond(request, svc, params, slot.entry, None, headers)
            result = await _upscale(request, svc, data, params, prefs, bill, journal)
            entry = await svc.cache.fill(slot, result.images, result.providers)
            return await _respond(
                request, svc, params, entry, result.images, _headers(result, slot.kind)
            )


async def _upscale(
    request: Request,
    svc: Services,
    data: bytes,
    params: UpscaleParams,
    prefs: Preferences,
    bill: Bill,
    journal: Journal | None,
) -> Upscaled:
    source = await svc.upscaler.prepare(data)
    try:
        result = await svc.upscaler.run(source, params, prefs, request_id(request), journal)
    except RoutingFailed as failed:
        failed.error.headers["x-upscale-attempts"] = ",".join(a.header() for a in failed.attempts)
        raise failed.error from None
    for provider, price in result.charges:
        bill.charge(provider, price)
    for provider in result.providers:
        bill.served(provider)
    return result


def _headers(result: Upscaled | None, cache: str, providers: Sequence[str] = ()) -> dict[str, str]:
    """The x-upscale headers: of the run that made the images, or of a cache hit (which
    names the providers that made them, at no cost and with no attempt)."""
    return {
        "x-upscale-provider": ",".join(dict.fromkeys(result.providers if result else providers)),
        "x-upscale-cost-usd": f"{result.cost_usd if result else 0:.6f}",
        "x-upscale-attempts": ",".join(a.header() for a in result.attempts) if result else "",
        "x-upscale-cache": cache,
    }


async def _respond(
    request: Request,
    svc: Services,
    params: UpscaleParams,
    stored: CachedResult,
    images: list[FinishedImage] | None,
    headers: dict[str, str],
) -> Response:
    """The images response: `url` from the stored files, `b64_json` from the images in hand
    (or read back from the cache on a hit)."""
    payload: dict[str, Any] = {
        "created": int(time.time()),
        "data": [],
        "output_format": stored.output_format,
        "size": stored.size,
    }
    if params.response_format == "b64_json":
        blobs = [i.data for i in images] if images is not None else await svc.cache.read(stored)
        # Megabytes of base64 and JSON: a worker thread's job, not the event loop's.
        content = await asyncio.to_thread(_b64_body, payload, blobs)
    else:
        payload["data"] = [{"url": svc.signed_url(request, f)} for f in stored.files]
        content = orjson.dumps(payload)
    return Response(content, media_type="application/json", headers=headers)


def _b64_body(payload: dict[str, Any], blobs: list[bytes]) -> bytes:
    payload["data"] = [{"b64_json": base64.b64encode(b).decode("ascii")} for b in blobs]
    return orjson.dumps(payload)


routes = [Route("/v1/images/edits", create_edit, methods=["POST"])]
