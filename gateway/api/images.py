"""POST /v1/images/edits: the upscale endpoint, shaped like OpenAI's image edits."""

from __future__ import annotations

import asyncio
import base64
import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query
from starlette.requests import Request
from starlette.responses import Response

from gateway.accounts import OPEN_ACCOUNT, Bill
from gateway.api.body import EditBody, read_edit_body
from gateway.api.context import Services, request_id, services
from gateway.api.estimate import estimate
from gateway.api.openapi import answers
from gateway.api.schemas import Estimate, ImagesResponse
from gateway.cache import CachedResult, cache_key
from gateway.errors import (
    IdempotencyGone,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    ResultsUnavailable,
)
from gateway.idempotency import HEADER, MAX_KEY_CHARS, Journal, fingerprint
from gateway.imaging import FinishedImage
from gateway.params import UpscaleParams, parse_params
from gateway.routing.preferences import Preferences, parse_preferences
from gateway.upscale import Upscaled, UpscaleFailed

router = APIRouter(tags=["images"])
_OK = {
    "description": "The images; with ?dryRun=true, the estimate instead.",
    "model": ImagesResponse | Estimate,
    "headers": {
        "x-upscale-provider": {"schema": {"type": "string"}, "description": "Who served."},
        "x-upscale-cost-usd": {"schema": {"type": "string"}, "description": "Billed, USD."},
        "x-upscale-attempts": {"schema": {"type": "string"}, "description": "Each attempt."},
        "x-upscale-cache": {"schema": {"type": "string"}, "description": "hit, miss, ..."},
    },
}


@router.post(
    "/v1/images/edits",
    summary="Upscale an image (OpenAI's image edits, multipart or JSON)",
    response_model=None,
    # The body is read by read_edit_body, streamed and bounded; openapi.py describes it.
    responses={
        **answers(None, 400, 401, 404, 408, 409, 413, 415, 429, 502, 503, 504),
        200: _OK,
    },
)
async def create_edit(
    request: Request,
    dry_run: Annotated[
        bool,
        Query(alias="dryRun", description="Validate and estimate the cost; call no provider."),
    ] = False,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=MAX_KEY_CHARS,
            description="A retry with the same key and body is served once and billed once.",
        ),
    ] = None,
) -> Response:
    svc = services(request)
    config = svc.config
    body = await read_edit_body(
        request, config.limits.max_image_bytes, config.limits.body_idle_timeout_s
    )
    params = parse_params(body.fields, config)
    prefs = parse_preferences(body.fields.get("provider"), svc.router.names)
    if params.model not in svc.catalog.ids:
        raise NotFound(
            f"The model '{params.model[:100]}' does not exist; this gateway serves "
            f"'{config.model.id}'.",
            param="model",
            code="model_not_found",
        )
    pinned = svc.catalog.pinned.get(params.model)
    if pinned is not None:  # as provider.only=[pinned], within what the request allows
        if (prefs.only is not None and pinned not in prefs.only) or pinned in prefs.ignore:
            raise InvalidRequest(
                f"The model '{params.model}' is served only through {pinned}, which the "
                "request's 'provider' preferences exclude.",
                param="provider",
            )
        prefs = replace(prefs, only=frozenset({pinned}))
    if dry_run:
        return await estimate(request, svc, body, params, prefs)
    header = request.headers.get(HEADER)
    if header is None:
        return (await _serve(request, svc, body, params, prefs)).response
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
    claimed = await svc.idempotency.claim(key, print_)
    stored = claimed.stored
    if stored is not None:
        # Already served (and billed) once: the same images, costing nothing more; URLs are
        # signed afresh (the first ones may have expired).
        if any(svc.result_path(f) is None for f in stored.result.files):
            if stored.result.disk not in ("", svc.cache.disk):
                raise ResultsUnavailable(  # retryable: a balancer may send it to that replica
                    "This request's result is on another replica's disk; retry (give the "
                    "replicas a shared results directory to serve it from any).",
                    code="results_storage_unavailable",
                )
            raise IdempotencyGone(
                "The request with this Idempotency-Key was served, but its result has since "
                "expired; send it with a new key.",
                param="Idempotency-Key",
            )
        headers = {
            **stored.headers,
            "x-upscale-cost-usd": f"{0:.6f}",
            "idempotent-replayed": "true",
        }
        return await _respond(request, svc, params, stored.result, None, headers)
    journal = claimed.journal
    assert journal is not None
    try:
        async with svc.idempotency.held(journal):
            answer = await _serve(request, svc, body, params, prefs, journal)
    except BaseException:
        # Failed: nothing to replay, so the client's retry may run.
        await asyncio.shield(svc.idempotency.release(journal))
        raise
    for file_id in answer.stored.files:  # a replay may come after the results' own lifetime
        await svc.results.keep(file_id, svc.config.idempotency.ttl_s)
        await svc.cache.files.keep(file_id, svc.config.idempotency.ttl_s)
    kept = {k: v for k, v in answer.response.headers.items() if k.startswith("x-upscale-")}
    await svc.idempotency.finish(journal, answer.stored, kept.items())
    return answer.response


def _account(request: Request) -> str:
    return request.scope["state"].get("key_id") or OPEN_ACCOUNT


@dataclass(frozen=True, slots=True)
class _Answer:
    response: Response
    stored: CachedResult  # where its images are kept (no files for an unkept b64_json)


async def _serve(
    request: Request,
    svc: Services,
    body: EditBody,
    params: UpscaleParams,
    prefs: Preferences,
    journal: Journal | None = None,
) -> _Answer:
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
            # A file only where a URL will name it, or a replay will read it.
            keep = params.response_format == "url" or journal is not None
            files = (
                [await svc.results.put(i.data, i.output_format) for i in result.images]
                if keep
                else []
            )
            stored = CachedResult.of(files, result.images, result.providers, svc.cache.disk)
            response = await _respond(
                request, svc, params, stored, result.images, _headers(result, "bypass")
            )
            return _Answer(response, stored)
        scope = _account(request) if svc.config.cache.scope == "key" else ""
        key = cache_key(data, params, svc.config.output, scope)
        async with svc.cache.slot(key, prefs) as slot:
            if slot.entry is not None:
                bill.counts["cache_hits"] += 1
                headers = _headers(None, slot.kind, slot.entry.providers)
                response = await _respond(request, svc, params, slot.entry, None, headers)
                return _Answer(response, slot.entry)
            result = await _upscale(request, svc, data, params, prefs, bill, journal)
            entry = await svc.cache.fill(slot, result.images, result.providers)
            response = await _respond(
                request, svc, params, entry, result.images, _headers(result, slot.kind)
            )
            return _Answer(response, entry)


async def _upscale(
    request: Request,
    svc: Services,
    data: bytes,
    params: UpscaleParams,
    prefs: Preferences,
    bill: Bill,
    journal: Journal | None,
) -> Upscaled:
    source = await svc.upscaler.prepare(data, prefs)
    try:
        result = await svc.upscaler.run(
            source, params, prefs, request_id(request), bill.spend, journal
        )
    except InvalidRequest as exc:
        if exc.code == "image_unsupported_by_providers" and bill.cheapest_only:
            # The budget left the cheapest provider only, and it cannot take this image: a
            # dearer one that can was held back by the budget, not by the image.
            required = params.required_flags()
            fit = ", ".join(
                e.name
                for e in svc.router.providers
                if e.name in source.prepared.inputs and required <= e.supports
            )
            if fit:
                raise QuotaExceeded(
                    f"The budget left covers only the cheapest provider, which cannot take "
                    f"this image ({exc}); {fit} could, at a higher price.",
                ) from None
        raise
    except UpscaleFailed as failed:
        error = copy.copy(failed.error)  # this request's headers on its own error
        error.headers = {
            **failed.error.headers,
            "x-upscale-attempts": ",".join(a.header() for a in failed.attempts),
            "x-upscale-cost-usd": f"{failed.spend.usd:.6f}",
        }
        raise error from None
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
        "metadata": _metadata(headers),  # beside the headers; the OpenAI SDKs keep it as extra
    }
    if params.response_format == "b64_json":
        blobs = [i.data for i in images] if images is not None else await _read(svc, stored)
        # Megabytes of base64 and JSON: a worker thread's job, not the event loop's.
        content = await asyncio.to_thread(_b64_body, payload, blobs)
    else:
        payload["data"] = [{"url": svc.signed_url(request, f)} for f in stored.files]
        content = orjson.dumps(payload)
    return Response(content, media_type="application/json", headers=headers)


def _metadata(headers: dict[str, str]) -> dict[str, Any]:
    attempts = headers.get("x-upscale-attempts", "")
    providers = headers.get("x-upscale-provider", "")
    return {
        "provider": providers.split(",")[0] if providers else None,
        "providers": providers.split(",") if providers else [],
        "cost_usd": float(headers.get("x-upscale-cost-usd", "0") or 0),
        "attempts": attempts.split(",") if attempts else [],
        "cache": headers.get("x-upscale-cache", ""),
    }


async def _read(svc: Services, stored: CachedResult) -> list[bytes]:
    """The images of a cache hit or a replay, from whichever store keeps them."""
    paths = [svc.result_path(f) for f in stored.files]
    if any(p is None for p in paths):
        raise ResultsUnavailable(
            "A stored image was evicted while being served; retry.",
            code="results_storage_unavailable",
        )
    return await asyncio.to_thread(lambda: [p.read_bytes() for p in paths if p])


def _b64_body(payload: dict[str, Any], blobs: list[bytes]) -> bytes:
    payload["data"] = [{"b64_json": base64.b64encode(b).decode("ascii")} for b in blobs]
    return orjson.dumps(payload)
